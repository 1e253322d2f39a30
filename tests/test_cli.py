"""The tbnc command line."""

import json

import pytest

from tbn_compiler import cli


def test_inspect_writes_json_and_dot(tmp_path, capsys):
    out_json, out_dot = tmp_path / "r.json", tmp_path / "g.dot"
    rc = cli.main(
        [
            "inspect",
            "models:MLP",
            "--shape",
            "2,64",
            "--p",
            "2",
            "--min-numel",
            "0",
            "--json",
            str(out_json),
            "--dot",
            str(out_dot),
        ]
    )
    assert rc == 0
    assert "layers.0" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert [r["p"] for r in report["layers"]] == [2, 2, 2]
    assert out_dot.read_text().startswith("digraph")


def test_bad_model_spec():
    with pytest.raises(SystemExit, match="package.module:factory"):
        cli.main(["inspect", "models", "--shape", "2,64"])
