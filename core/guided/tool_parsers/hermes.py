"""Hermes / Qwen format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them,
with content around them."""
from __future__ import annotations

import json

from tokenmill.guided.tool_parsers.base import (CallRegion, Segment, ToolParser, held_back, parameters_schema,
                                                scan_object, skip_ws, split_at_marker)

BEGIN, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    markers = (BEGIN, END)

    def structural_tag(self, tools: list[dict]) -> dict | None:
        return {"structures": [{"begin": f'{BEGIN}\n{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
                                "schema": parameters_schema(t), "end": f"}}\n{END}"} for t in tools],
                "triggers": [BEGIN]}

    def scan(self, text: str, final: bool) -> list[Segment]:
        segments: list[Segment] = []
        i = 0
        while i < len(text):
            content, start = split_at_marker(text, i, BEGIN, final)
            if content and (i == 0 or content.strip()):  # whitespace between and after calls is not content
                segments.append(content)
            if start < 0:
                break
            body = start + len(BEGIN)
            close = text.find(END, body)
            # while streaming, what may be the start of the end tag is not part of the call yet
            stop = close if close >= 0 else len(text) - (0 if final else held_back(text[body:], END))
            j = skip_ws(text, body)
            if j < stop and text[j] == "{":
                region, obj_end = scan_object(text, j, stop)
                # Only whitespace (or, while streaming, the start of the end tag) may follow the object.
                tail = text[obj_end:stop].strip() if obj_end is not None else ""
                if tail and not (close < 0 and END.startswith(tail)):
                    region.done, region.name = False, None
            else:
                region = CallRegion("")
            if close < 0:
                region.raw = text[start:]
                region.closed = final  # an unterminated but complete object still counts
                segments.append(region)
                break
            region.raw, region.closed = text[start:close + len(END)], True
            segments.append(region)
            i = close + len(END)
        return segments
