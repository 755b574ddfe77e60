"""`lvface plot` on a real run directory, and the progress helper (on for a terminal, off in logs)."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lvface.progress import progress, progress_enabled, run_with_progress
from lvface.run_folder import METRICS_NAME

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_utils import REPO, run_env, scraped_run  # noqa: E402


def test_lvface_plot_draws_the_pngs_of_a_real_run(tmp_path):
    run = scraped_run()  # 16 steps on 2 ranks, verifications at steps 0, 8 and 16
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "lvface.cli", "plot", str(run.run_dir), "--out", str(out)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(Path(line).name for line in proc.stdout.split())
    assert written == ["accuracy.png", "loss.png", "lr.png", "throughput.png"]
    for name in written:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == (700, 400)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 20, f"{name} looks blank"


def test_lvface_plot_without_a_log_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lvface.cli", "plot", str(tmp_path)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{METRICS_NAME} not found" in proc.stderr and "Traceback" not in proc.stderr


def test_progress_is_quiet_unless_a_terminal_or_forced(monkeypatch, capsys):
    monkeypatch.delenv("LVFACE_PROGRESS", raising=False)
    assert not progress_enabled()  # pytest captures stderr: not a terminal
    assert list(progress(range(3), desc="quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""

    monkeypatch.setenv("LVFACE_PROGRESS", "1")
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(progress(range(3), desc="loud", unit="img")) == [0, 1, 2]
    text = stream.getvalue()
    assert "loud" in text and "img/s" in text  # the rate (and the ETA once the total is known)


@pytest.mark.parametrize("code,rc", [("print('out'); import sys; print('err', file=sys.stderr)", 0),
                                     ("raise SystemExit(3)", 3)])
def test_run_with_progress_returns_the_output(code, rc):
    proc = run_with_progress([sys.executable, "-c", code], desc="child")
    assert proc.returncode == rc
    if rc == 0:
        assert (proc.stdout, proc.stderr) == ("out\n", "err\n")
