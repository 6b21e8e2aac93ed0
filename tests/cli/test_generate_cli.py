import json
import os
import subprocess
import sys

import pytest

from aigc.cli import main
from aigc.config import SampleConfig
from aigc.generate import Request, generate
from aigc.models import load_run

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_cli_prints_only_the_text_on_stdout(make_run, capsys):
    run_dir = make_run()
    code, out, err = run_cli(capsys, run_dir, "--prompt", "a film", "--seed", 3, "--max-new-tokens", 12)
    assert code == 0
    run = load_run(run_dir)
    config = SampleConfig(seed=3, max_new_tokens=12)
    [expected] = generate(run.model, run.tokenizer, [Request("a film", config=config)])
    assert out == expected.text + "\n"
    assert "tokens/s" in err


def test_generate_cli_stream_prints_the_same_text(make_run, capsys):
    run_dir = make_run()
    args = (run_dir, "--label", "pos", "--seed", 5, "--max-new-tokens", 10)
    _, plain, _ = run_cli(capsys, *args)
    code, streamed, _ = run_cli(capsys, *args, "--stream")
    assert code == 0 and streamed == plain


def test_generate_cli_json_one_object_per_sample_with_logprobs(make_run, capsys):
    run_dir = make_run()
    lengths = ("--max-new-tokens", 6, "--min-new-tokens", 6)
    code, out, _ = run_cli(capsys, run_dir, "-n", 3, "--json", "--seed", 1, *lengths, "--logprobs", 2)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    for record in records:
        assert record["completion_tokens"] == len(record["token_ids"]) == len(record["logprobs"]) == 6
        assert record["finish_reason"] == "length" and len(record["logprobs"][0]["top_logprobs"]) == 2
    assert len({tuple(r["token_ids"]) for r in records}) == 3  # seeds 1, 2, 3: different samples


def test_generate_cli_stream_json_emits_token_objects(make_run, capsys):
    code, out, _ = run_cli(capsys, make_run(), "--json", "--stream", "--max-new-tokens", 4, "--min-new-tokens", 4)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["object"] for r in records] == ["token"] * 4 + ["sample"]
    assert "".join(r["text"] for r in records[:4]) == records[-1]["text"]


def test_generate_cli_reads_a_chinese_prompt_file_and_lstm_runs(make_run, capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("这部电影非常好看", encoding="utf-8")
    code, out, _ = run_cli(capsys, make_run("lstm"), "--prompt-file", prompt, "--max-new-tokens", 8)
    assert code == 0 and out.endswith("\n")


def test_generate_cli_warns_when_the_prompt_is_truncated(make_run, capsys):
    code, _, err = run_cli(capsys, make_run(), "--prompt", "word " * 200, "--max-new-tokens", 2)
    assert code == 0 and "warning" in err and "last 63 tokens" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--temperature", "-1"), "--temperature must be 0 (greedy) or in"),
        (("--top-p", "0"), "--top-p must be in [1e-06, 1]"),
        (("--top-p", "1.5"), "--top-p must be in [1e-06, 1]"),
        (("--top-k", "-1"), "--top-k must be >= 0"),
        # Non-finite sampling: unchecked, these give NaN probabilities and text such as " candy candy candy", exit 0.
        (("--temperature", "1e39"), "--temperature must be 0 (greedy) or in [0.001, 100], got 1e+39"),
        (("--temperature", "inf"), "--temperature must be 0 (greedy) or in [0.001, 100], got inf"),
        (("--temperature", "nan"), "--temperature must be 0 (greedy) or in [0.001, 100], got nan"),
        (("--temperature", "1e-39"), "--temperature must be 0 (greedy) or in [0.001, 100], got 1e-39"),
        (("--top-p", "1e-46"), "--top-p must be in [1e-06, 1]"),
        (("--repetition-penalty", "inf"), "--repetition-penalty must be in [1, 100]"),
        (("--stop", "x" * 5000), "--stop strings may hold at most 4096 characters in all"),
        (("-n", "0"), "-n must be in [1, 64]"),
        (("--max-new-tokens", "0"), "--max-new-tokens must be in [1, 8192]"),
        (("--max-new-tokens", "1000000"), "--max-new-tokens must be in [1, 8192]"),
        (("--label", "meh"), "unknown label 'meh'; this run knows: pos, neg"),
        (("--prompt-file", "missing.txt"), "prompt file not found"),
    ],
)
def test_generate_cli_bad_input_is_one_line_error(make_run, capsys, argv, message):
    code, out, err = run_cli(capsys, make_run(), *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("aigc generate: error: ") and message in err


def test_generate_cli_missing_or_incomplete_run(make_run, capsys, tmp_path):
    code, _, err = run_cli(capsys, tmp_path / "nowhere")
    assert code == 2 and "run folder not found" in err
    run_dir = make_run()
    (run_dir / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, run_dir)
    assert code == 2 and "model.safetensors is missing" in err


def test_generate_console_script_output_pipes(make_run):
    run_dir = make_run()
    argv = [sys.executable, "-m", "aigc", "generate", str(run_dir), "--json"]
    argv += ["--max-new-tokens", "3", "--min-new-tokens", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0
    assert json.loads(result.stdout)["completion_tokens"] == 3 and "tokens/s" in result.stderr


def test_generate_cli_guidance_matches_the_library_and_refuses_a_lone_negative(make_run, capsys):
    run_dir = make_run()
    flags = ("--label", "pos", "--negative-label", "neg", "--negative-prompt", "a dull film", "--seed", 2)
    code, out, _ = run_cli(capsys, run_dir, "--prompt", "a film", *flags, "--guidance-scale", 3, "--max-new-tokens", 8)
    assert code == 0
    run = load_run(run_dir)
    config = SampleConfig(seed=2, max_new_tokens=8, guidance_scale=3.0)
    request = Request("a film", "pos", config, negative_prompt="a dull film", negative_label="neg")
    assert out == generate(run.model, run.tokenizer, [request])[0].text + "\n"
    code, out, err = run_cli(capsys, run_dir, "--negative-prompt", "a dull film")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--guidance-scale" in err
