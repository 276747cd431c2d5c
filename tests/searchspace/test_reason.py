"""The one line a record or a note gives for an exception."""

from __future__ import annotations

from searchspace._reason import first_line


def test_first_line_drops_colour_codes_blank_lines_and_the_rest():
    # The ONNX exporter's own words: a coloured step name, then the detail on later lines.
    exc = RuntimeError("\n  Failed to decompose. \x1b[96mThis is step 2/3\x1b[0m of exporting.\nDetail: x\n")
    assert first_line(exc) == "RuntimeError: Failed to decompose. This is step 2/3 of exporting."
    assert first_line(exc, named=False) == "Failed to decompose. This is step 2/3 of exporting."
    assert first_line(ValueError(), named=False) == "ValueError" and first_line(ValueError()) == "ValueError: "
    assert first_line(KeyError("x" * 500), limit=20) == "KeyError: 'xxxxxxxxx"
