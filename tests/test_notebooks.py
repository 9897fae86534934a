"""colab/*.ipynb: committed without outputs, and each runs top to bottom on CPU.

Each notebook ends with a cell that prints the figures it computed as one JSON line;
the slow tests execute the notebook in a fresh kernel (nbclient, the venv's `python3`
kernel, JAX on CPU, its `SMALL` settings) and check those figures.
"""

import json
import os

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart", "compress", "translate")


def _read(name: str):
    return nbformat.read(os.path.join(REPO, "colab", f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    book = _read(name)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert book.metadata.kernelspec.name == "python3"
    # The install cell installs only where jaxllm cannot be imported (Colab), never in CI.
    assert "except ImportError:" in code[0].source and "pip install" in code[0].source
    assert "SMALL = " in code[1].source and "jax.default_backend()" in code[1].source


def _execute(name: str, cwd: str) -> dict:
    from nbclient import NotebookClient

    book = _read(name)
    NotebookClient(
        book, kernel_name="python3", timeout=600, resources={"metadata": {"path": cwd}}
    ).execute()
    last = [c for c in book.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel inherits this process's environment: CPU backend, one device (the
    notebook's own view, not conftest's 8 fake devices), the shared data cache."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    monkeypatch.setenv("XLA_FLAGS", flags.strip())


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_samples(tmp_path, kernel_env):
    out = _execute("quickstart", str(tmp_path))
    assert out["backend"] == "cpu" and out["steps"] == 40
    assert out["final_loss"] < out["first_loss"] - 1.0
    assert 1.0 < out["perplexity"] < 4096
    assert all(text.startswith("The list type") for text in out["samples"].values())
    assert os.path.exists(tmp_path / "runs" / "quickstart" / "metrics.jsonl")


@pytest.mark.slow
def test_compress_reports_every_stage_and_int8_is_smaller(tmp_path, kernel_env):
    out = _execute("compress", str(tmp_path))
    rows = {r["stage"]: r for r in out["rows"]}
    assert list(rows) == ["teacher", "distill", "prune", "int8"]
    assert rows["distill"]["params"] < rows["teacher"]["params"]  # half depth
    # 2:4 zeroes half of every attention and MLP kernel of the SMALL student (1 layer,
    # d_model 64, d_ff 256); embeddings, norms and biases stay dense.
    kernels = 4 * 64 * 64 + 2 * 64 * 256
    assert rows["distill"]["nonzero"] - rows["prune"]["nonzero"] == kernels // 2
    assert rows["int8"]["quant"].startswith("int8")
    assert rows["int8"]["bytes_on_disk"] < rows["prune"]["bytes_on_disk"]  # int8 < fp32
    assert rows["int8"]["eval_perplexity"] == pytest.approx(rows["prune"]["eval_perplexity"], 0.05)
    assert (tmp_path / "runs" / "compressed" / "quality_vs_size.png").stat().st_size > 1000


@pytest.mark.slow
def test_translate_beats_copying_the_source(tmp_path, kernel_env):
    out = _execute("translate", str(tmp_path))
    assert out["final_loss"] < out["first_loss"]
    # Copying the English source scores BLEU ~1 against the German references.
    assert out["bleu_greedy"] > out["bleu_copy_source"] + 2.0
    assert out["bleu_beam"] > out["bleu_copy_source"] + 2.0
    assert len(out["translations"]) == 4 and all(out["translations"].values())
