"""Mistral format: content, then ``[TOOL_CALLS]`` and a JSON array of ``{"name", "arguments"}``
objects, or (tokenizer v11+) ``[TOOL_CALLS]name[ARGS]{...}`` per call."""
from __future__ import annotations

import json

from tokenmill.guided.tool_parsers.base import (CallRegion, Segment, ToolParser, held_back, scan_call_array,
                                                skip_ws, split_at_marker)

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"
_DECODER = json.JSONDecoder()


class MistralToolParser(ToolParser):
    name = "mistral"
    markers = (TOOL_CALLS, ARGS)

    def scan(self, text: str, final: bool) -> list[Segment]:
        content, start = split_at_marker(text, 0, TOOL_CALLS, final)
        segments: list[Segment] = [content] if content else []
        i = start
        while i >= 0:
            j = skip_ws(text, i + len(TOOL_CALLS))
            if j >= len(text):
                if final:
                    segments.append(CallRegion(text[i:], closed=True))
                break
            if text[j] == "[" and not text.startswith(ARGS, j):
                calls, stop = scan_call_array(text, j, final)
                if calls:  # the marker belongs to the first call's text (content if it fails)
                    calls[0].raw = text[i:skip_ws(text, j + 1)] + calls[0].raw
                elif stop is None and final:
                    calls = [CallRegion(text[i:], closed=True)]
                segments.extend(calls)
                if stop is None:
                    break
                i = text.find(TOOL_CALLS, stop)
                if i < 0:
                    if text[stop:].strip() or final:
                        segments.append(text[stop:])
                    break
                if text[stop:i]:
                    segments.append(text[stop:i])
                continue
            region, i = self._named_call(text, i, j, final)
            segments.append(region)
        return segments

    def _named_call(self, text: str, marker: int, j: int, final: bool) -> tuple[CallRegion, int]:
        """``name[ARGS]{...}``; returns the region and where the next ``[TOOL_CALLS]`` starts (-1: none)."""
        a = text.find(ARGS, j)
        nxt = text.find(TOOL_CALLS, j)
        if a < 0 or (0 <= nxt < a):
            end = len(text) if nxt < 0 else nxt
            pending = text[j:end]
            pending = pending[:len(pending) - held_back(pending, ARGS)]
            closed = final or nxt >= 0 or not (pending == "" or _name_like(pending))
            return CallRegion(text[marker:end], closed=closed), nxt
        region = CallRegion(text[marker:] if nxt < 0 else text[marker:nxt])
        name = text[j:a].strip()
        if not _name_like(name):
            region.closed = True
            return region, nxt
        region.name = name
        s = skip_ws(text, a + len(ARGS))
        stop = len(text) if nxt < 0 else nxt
        try:
            value, e = _DECODER.raw_decode(text[:stop], s)
        except ValueError:
            region.args = text[s:stop] if s < stop and text[s] == "{" else ""
            region.closed = final or nxt >= 0
            return region, nxt
        if isinstance(value, dict) and not text[e:stop].strip():
            region.args, region.arguments, region.done = text[s:e], value, True
        region.closed = True
        return region, nxt


def _name_like(s: str) -> bool:
    return bool(s) and all(c.isalnum() or c in "_-." for c in s)
