"""The few-shot diagnostics' shared driver: errors exit 2 with the reason, before any query."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from omnienc.benchmarks import fewshot_localise, fewshot_negatives
from omnienc.benchmarks.fewshot_diagnostics import interval_text


@pytest.mark.parametrize("main", [fewshot_localise.main, fewshot_negatives.main])
def test_main_refuses_a_missing_checkpoint_or_a_random_encoder(
    main: Callable[[list[str]], int], tmp_path: Path, capsys
):
    with pytest.raises(SystemExit) as exc:
        main(["--encoder", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--encoder", "random:resconv_tiny", "--out", str(tmp_path / "out"), "--quick"])
    assert exc.value.code == 2
    assert "no in-context head" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_interval_text():
    assert interval_text({"mean": 0.12345, "lo": 0.1, "hi": 0.2}) == "0.123 [0.10, 0.20]"
    assert interval_text({"mean": None, "lo": None, "hi": None}) == "–"
