from spikingbrain.evaluation.report import flatten, format_value, markdown_table, side_by_side


def test_format_value():
    assert [format_value(v) for v in (3.0, 0.12345678, 12345.6, 2.5e-6, True, None, 7, "a|b")] == [
        "3.000", "0.1235", "12346", "2.500e-06", "yes", "—", "7", "a\\|b"]


def test_markdown_table_columns_and_missing_values():
    table = markdown_table([{"model": "a", "ppl": 12.5}, {"model": "b", "acc": 0.25}])
    assert table.splitlines() == ["| model | ppl | acc |", "|---|---|---|", "| a | 12.50 | — |", "| b | — | 0.2500 |"]
    assert markdown_table([{"x": 1, "y": 2}], columns=["y"]) == "| y |\n|---|\n| 2 |"
    assert markdown_table([]) == ""


def test_side_by_side_and_flatten():
    t = side_by_side({"student": {"ppl": 20.0}, "teacher": {"ppl": 10.0, "acc": 0.5}})
    assert t.splitlines()[2:] == ["| ppl | 20.00 | 10.00 |", "| acc | — | 0.5000 |"]
    assert flatten({"ppl": {"ppl": 3.0, "rows": [1]}, "n": 2}) == {"ppl.ppl": 3.0, "n": 2}
