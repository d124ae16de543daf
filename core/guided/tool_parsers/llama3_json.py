"""Llama 3.1/3.2 JSON tool calls: the whole output is ``{"name": ..., "parameters": {...}}`` (or
``"arguments"``), optionally after ``<|python_tag|>``; several calls are separated by ``;``."""
from __future__ import annotations

import json

from tokenmill.guided.tool_parsers.base import (CallRegion, Segment, ToolParser, held_back, parameters_schema,
                                                scan_object, skip_ws)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def structural_tag(self, tools: list[dict]) -> dict | None:
        return {"structures": [{"begin": f'{{"name": {json.dumps(t["function"]["name"])}, "parameters": ',
                                "schema": parameters_schema(t), "end": "}"} for t in tools],
                "triggers": ['{"name": ']}

    def scan(self, text: str, final: bool) -> list[Segment]:
        i = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, i):
            i = skip_ws(text, i + len(PYTHON_TAG))
        elif not final and held_back(text[i:], PYTHON_TAG) == len(text) - i:
            return []  # nothing but (the start of) the tag yet: undecided
        if i >= len(text):
            return [] if not final else [text] if text.strip() else []
        if text[i] != "{":
            return [text]  # plain content
        segments: list[Segment] = []
        while True:
            region, stop = scan_object(text, i)
            if stop is None:
                region.closed = final
                segments.append(region)
                return segments
            segments.append(region)
            j = skip_ws(text, stop)
            if j < len(text) and text[j] == ";":
                j = skip_ws(text, j + 1)
            if j >= len(text):
                return segments
            if text[j] != "{":
                segments.append(text[stop:])  # trailing text after the calls
                return segments
            i = j
