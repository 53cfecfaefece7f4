"""Every shell command in the README's "Commands" section runs as written (issue 17).

The block is run verbatim by `bash -e` in a fresh shell, from a scratch directory laid out like the
repository, so its relative paths mean what they mean in a clone:
- `.venv` is a link to the environment running this test, so `source .venv/bin/activate` is tried for real
  and `dftlite` must then be on PATH;
- `configs/smollm2-135m_gsm8k_dft2_cpu.yaml` is the shipped recipe with only its sizes made tiny: the tiny
  test model instead of SmolLM2-135M, 4 training problems, 8 new tokens;
- `dftlite/resources/gsm8k/*.jsonl` are the bundled files.
The one edit to the text: `dftlite demo` gets tiny-size options (`DEMO_TINY`), because the demo has no
recipe to shrink; it still runs on the real embedded model.

Slow (measured 140 s with OMP_NUM_THREADS=1 on 2 CPU cores busy with other work), so `make test`
skips it (pyproject's addopts); run it with
    make test-readme        # or: .venv/bin/python -m pytest -m readme tests/test_readme.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

RECIPE = "configs/smollm2-135m_gsm8k_dft2_cpu.yaml"
DEMO_TINY = "--num_train 2 --num_eval 2 --demo_max_new_tokens 8 --demo_epochs 1"


def readme_commands() -> str:
    """The first ```bash block after '## Commands' in README.md."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_commands_activate_the_venv_first():
    block = readme_commands()
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "source .venv/bin/activate", "dftlite is not on PATH until the venv is active"
    assert "dftlite demo" in block and "dftlite export" in block
    exports = re.findall(r"--export_dir (\S+)", block)
    assert exports and all(path.startswith("runs/") for path in exports), "outputs stay under runs/ (git-ignored)"


@pytest.mark.readme
def test_readme_commands_run_as_written(tmp_path, tiny_model_dir):
    activate = Path(sys.prefix) / "bin" / "activate"
    if not activate.is_file() or shutil.which("bash") is None:
        pytest.skip("needs bash and a virtual environment with bin/activate")
    os.symlink(sys.prefix, tmp_path / ".venv")
    (tmp_path / "dftlite" / "resources").mkdir(parents=True)
    os.symlink(REPO / "dftlite" / "resources" / "gsm8k", tmp_path / "dftlite" / "resources" / "gsm8k")
    recipe = yaml.safe_load((REPO / RECIPE).read_text())
    recipe.update(model_name_or_path=str(tiny_model_dir), max_examples=4, max_new_tokens=8, token_budget=0)
    (tmp_path / "configs").mkdir()
    (tmp_path / RECIPE).write_text(yaml.safe_dump(recipe))

    block = readme_commands()
    assert re.search(r"^dftlite demo$", block, re.M)
    script = re.sub(r"^dftlite demo$", f"dftlite demo {DEMO_TINY}", block, flags=re.M)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    # a fresh shell: no profile, no rc file; PATH without the venv, so activation must do its job
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(sys.prefix))
    env.pop("VIRTUAL_ENV", None)
    out = subprocess.run(["bash", "--noprofile", "--norc", "-e", "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1800)
    if os.environ.get("DFTLITE_README_LOG"):  # to read the whole screen of a run
        Path(os.environ["DFTLITE_README_LOG"]).write_text(out.stdout + "\n=== stderr ===\n" + out.stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for path in ("runs/smollm2-135m_gsm8k/pool/pool.jsonl", "runs/smollm2-135m_gsm8k_dft2/adapter/adapter_config.json",
                 "runs/smollm2-135m_gsm8k/dev-pool/pool.jsonl", "runs/smollm2-135m_gsm8k_dft2/export/README.md",
                 "runs/demo/export/README.md"):
        assert (tmp_path / path).is_file(), path
