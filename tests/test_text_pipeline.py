"""The text pipeline and CLI: strings out, prompt kept, saved and reloaded offline, the plain,
cached, speculative (frozen or model drafter) and block paths; the bundled stdlib model."""

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM

from specdiff.cli import main
from specdiff.discrete import MaskedDiffusionScheduler
from specdiff.paths import asset
from specdiff.pipelines import SpeculativeTextDiffusionPipeline
from specdiff.text import char_tokenizer

BUNDLED = asset("models", "stdlib-text")


def tiny_bert(tokenizer, seed=0, hidden=16):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, initializer_range=0.3)
    return BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-text")
    tokenizer = char_tokenizer("abc de")
    scheduler = MaskedDiffusionScheduler(vocab_size=len(tokenizer))
    SpeculativeTextDiffusionPipeline(tiny_bert(tokenizer), tokenizer, scheduler).save_pretrained(folder)
    tiny_bert(tokenizer, seed=1, hidden=8).save_pretrained(folder / "drafter")
    return folder


def test_pipeline_round_trips_and_returns_strings_that_continue_the_prompt(tiny_folder):
    pipe = SpeculativeTextDiffusionPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["ab", "d"], num_samples=2, length=12, num_inference_steps=16, window=4,
               generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert len(out.texts) == 4 and all(isinstance(t, str) for t in out.texts)
    assert [t[:2] for t in out.texts[:2]] == ["ab", "ab"] and out.texts[2].startswith("d")
    assert all(len(t) == len(p) + 12 for t, p in zip(out.texts, ["ab", "ab", "d", "d"]))
    assert set("".join(out.texts)) <= set("abc de") and out.stats.num_steps == 16


def test_generic_diffusers_loader_finds_the_pipeline_file(tiny_folder):
    from diffusers import DiffusionPipeline

    import specdiff.pipelines.pipeline_speculative_text as module

    pipe = DiffusionPipeline.from_pretrained(tiny_folder, custom_pipeline=module.__file__, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(prompt="ab", length=3, num_inference_steps=3).texts[0].startswith("ab")


def test_window_one_plain_and_cached_give_the_same_tokens(tiny_folder):
    pipe = SpeculativeTextDiffusionPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    runs = [pipe(prompt="a", num_samples=3, length=10, num_inference_steps=12,
                 generator=torch.Generator().manual_seed(0), **kw)
            for kw in ({"window": None}, {"window": None, "cache": True}, {"window": 1})]
    assert all(torch.equal(runs[0].sequences, r.sequences) for r in runs[1:])
    assert runs[1].stats.target_rows < runs[0].stats.target_rows


def test_model_drafter_and_blocks(tiny_folder):
    pipe = SpeculativeTextDiffusionPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    drafter = BertForMaskedLM.from_pretrained(tiny_folder / "drafter").eval()
    out = pipe(prompt="ab", length=8, num_inference_steps=16, window=4, drafter=drafter,
               generator=torch.Generator().manual_seed(0))
    assert out.stats.draft_calls > 0 and out.texts[0].startswith("ab")
    blocks = pipe(length=10, num_inference_steps=12, window=4, block_size=4, generator=torch.Generator().manual_seed(0))
    assert len(blocks.texts[0]) == 10 and blocks.stats.num_steps == 12  # 3 blocks of 4 steps
    with pytest.raises(ValueError, match="multiple of 3"):
        pipe(length=10, num_inference_steps=10, block_size=4)


def test_a_prompt_with_characters_the_tokenizer_does_not_know_is_refused(tiny_folder):
    """They would become [UNK], a special token that decoding drops: the text would lose them."""
    pipe = SpeculativeTextDiffusionPipeline.from_pretrained(tiny_folder)
    with pytest.raises(ValueError, match=r"does not know: \['x', 'é'\]"):
        pipe(prompt="abxé", length=4, num_inference_steps=4)


def test_cli_prints_texts_and_the_comparison_table(tiny_folder, tmp_path, capsys):
    code = main(["generate", "--model", str(tiny_folder), "--prompt", "ab", "--length", "8", "--steps", "16",
                 "--window", "4", "--num-images", "2", "--compare", "--no-progress", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0 and printed.count("--- sample") == 2
    for name in ("plain", "cached", "speculative"):
        assert any(line.startswith(name) for line in printed.splitlines())
    report = json.loads((tmp_path / "stats.json").read_text())
    assert report["plain"]["target_calls"] == 16 and report["texts"][0].startswith("ab")
    assert main(["generate", "--model", str(tiny_folder), "--length", "4", "--steps", "4", "--drafter", "model",
                 "--num-images", "1", "--no-progress", "--out", str(tmp_path)]) == 0


@pytest.mark.skipif(not (BUNDLED / "model_index.json").exists(), reason="bundled text model not built")
def test_bundled_text_model_generates_from_a_prompt():
    pipe = SpeculativeTextDiffusionPipeline.from_pretrained(BUNDLED)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="Return the ", length=32, num_inference_steps=32, window=8,
               generator=torch.Generator().manual_seed(0))
    assert out.texts[0].startswith("Return the ") and len(out.texts[0]) == 11 + 32
    assert out.stats.target_calls < 32


def test_the_text_benchmark_page_is_the_saved_benchmark():
    """docs/text.md's numbers are what `python -m specdiff.workbench.bench_text --table` prints."""
    from pathlib import Path

    from specdiff.workbench.bench_text import table

    readme = (Path(__file__).resolve().parents[1] / "docs" / "text.md").read_text()
    shown = readme.split("<!-- text-bench -->\n", 1)[1].split("\n<!-- /text-bench -->", 1)[0]
    results = json.loads(asset("bench", "text.json").read_text())
    assert table(results) in shown
    assert all(r["same_law_as_plain"]["passed"] for r in results["runs"] if r["sampler"] == "speculative")


def test_the_default_automatic_window_repeats_a_seeds_text(tiny_folder):
    """The pipeline builds a new chain per call: its calibration is found again (keyed by the
    model, not the chain object), so the same seed gives the same tokens."""
    pipe = SpeculativeTextDiffusionPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    runs = [pipe(prompt="ab", num_samples=2, length=12, num_inference_steps=16,
                 generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert runs[0].stats.window_choice.startswith("auto window")
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].stats.chosen_windows == runs[1].stats.chosen_windows


def test_two_processes_split_the_texts_and_make_those_of_one(tiny_folder, tmp_path, torchrun_generate):
    """Text models under torchrun/accelerate: the seeds' batches are split between processes and
    rank 0 prints and writes them all; with an integer window the texts are those of one process."""
    launch, finish = torchrun_generate
    runs = {n: launch(n, "--model", str(tiny_folder), "--prompt", "ab", "--length", "6", "--steps", "6", "--window",
                      "3", "--num-images", "4", "--batch-size", "2", "--out", str(tmp_path / f"p{n}")) for n in (1, 2)}
    reports = {}
    for n, run in runs.items():
        stdout = finish(run)
        assert stdout.count("--- sample") == 4 and stdout.count("wrote ") == 1  # rank 0 alone reports
        reports[n] = json.loads((tmp_path / f"p{n}" / "stats.json").read_text())
    assert reports[2]["processes"] == 2 and {b["process"] for b in reports[2]["speculative"]["batches"]} == {0, 1}
    assert reports[1]["texts"] == reports[2]["texts"] and len(reports[1]["texts"]) == 4


def test_cli_replay_reproduces_a_text_runs_texts_batch_by_batch(tiny_folder, tmp_path, capsys):
    from test_cli import fails_with

    def generate(out, *extra):
        argv = ["generate", "--model", str(tiny_folder), "--prompt", "ab", "--length", "8", "--steps", "16",
                "--block-size", "4", "--num-images", "3", "--batch-size", "2", "--drafter", "model", "--no-progress",
                "--out", str(tmp_path / out), *extra]
        assert main(argv) == 0
        return json.loads((tmp_path / out / "stats.json").read_text())

    first = generate("first", "--window", "4")
    other = generate("other", "--window", "3")  # another schedule gives other texts: the test has power
    assert other["texts"] != first["texts"] and first["speculative"]["proposed"] > first["speculative"]["accepted"]
    again = generate("again", "--replay", str(tmp_path / "first" / "stats.json"))
    assert again["texts"] == first["texts"] and again["window"] == f"replay of {tmp_path / 'first' / 'stats.json'}"
    assert [b["chosen_windows"] for b in again["speculative"]["batches"]] == [
        b["chosen_windows"] for b in first["speculative"]["batches"]]
    capsys.readouterr()
    base = ["generate", "--model", str(tiny_folder), "--prompt", "ab", "--length", "8", "--steps", "16",
            "--block-size", "4", "--num-images", "3", "--batch-size", "2", "--no-progress", "--out", str(tmp_path)]
    fails_with(capsys, base + ["--replay", str(tmp_path / "nope.json")], "--replay", "nope.json", "not a stats.json")
    fails_with(capsys, base + ["--seed", "5", "--replay", str(tmp_path / "first" / "stats.json")],
               "no batch of seeds [5, 6]", "--batch-size")


def test_a_prompt_and_length_beyond_the_models_positions_is_refused_by_the_pipeline(tiny_folder):
    pipe = SpeculativeTextDiffusionPipeline.from_pretrained(tiny_folder)  # 32 positions
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"prompt \(2 tokens\) and length=31 need 33 positions, and the text model "
                                         r"has 32; pass length=30 or less"):
        pipe(prompt="ab", length=31, num_inference_steps=2, window=2)
    with pytest.raises(ValueError, match="the prompt is 32 tokens and the text model has 32 positions; shorten"):
        pipe(prompt="a" * 32, length=1, num_inference_steps=2, window=None)
    assert pipe(prompt="ab", length=30, num_inference_steps=2, window=2).sequences.shape == (1, 32)
