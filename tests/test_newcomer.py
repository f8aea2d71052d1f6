"""What a newcomer meets first: help on every flag with two example lines, training's estimate of
its hours on a CPU before the first step with the CPU preset's command, a refusal that names a free
--out, and score's line on how to turn scores into decisions."""

import argparse
import re
import shutil

import pytest

import flow_mismatch as fm


def subcommands():
    parser = fm.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def test_every_flag_of_every_subcommand_has_help():
    _, commands = subcommands()
    for name, p in commands.items():
        for action in p._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"
        named = set(re.findall(r"--[a-z][\w-]*", " ".join(a.help for a in p._actions)))
        if name == "demo":  # the demo's help names only flags the demo has
            assert named <= {o for a in p._actions for o in a.option_strings}, named


def test_top_level_help_shows_the_demo_and_the_cpu_path_as_commands_that_parse(capsys):
    parser, _ = subcommands()
    lines = [line.split("#")[0].split() for line in parser.epilog.splitlines() if "flow_mismatch.py" in line]
    assert [line[2] for line in lines] == ["demo", "train"] and "tiny" in lines[1]
    for line in lines:
        parser.parse_args(line[2:])
    with pytest.raises(SystemExit):
        fm.main(["--help"])
    assert parser.epilog in capsys.readouterr().out


class FirstStep(Exception):
    pass


def test_train_on_a_cpu_says_its_hours_and_the_cpu_command_before_the_first_step(mvtec, tmp_path, monkeypatch):
    build = fm.build_model
    monkeypatch.setattr(fm, "build_model", lambda preset, n=0: build("tiny", n))  # the paper's recipe, a fast U-Net
    monkeypatch.setattr(fm, "cfm_step", lambda *a, **k: (_ for _ in ()).throw(FirstStep()))
    shutil.copytree(mvtec / "weave", tmp_path / "mvtec" / "bottle")
    monkeypatch.chdir(tmp_path)
    lines = []
    with pytest.raises(FirstStep):
        fm.train("mvtec/bottle", fm.train_config("paper", image_size=32, steps=10 ** 6), None, "cpu",
                 log=lines.append)
    assert ", 1 step/epoch, " in lines[0]  # 8 images, batches of 32
    hours = float(re.search(r"about ([\d,.]+) h for 1,000,000 steps", lines[1])[1].replace(",", ""))
    assert hours >= 1 and "python flow_mismatch.py train --data mvtec/bottle --preset tiny --out runs/bottle_tiny" \
        in lines[1]


def test_a_folder_holding_another_run_is_refused_with_a_free_out(mvtec, tmp_path, monkeypatch, capsys):
    shutil.copytree(mvtec / "weave", tmp_path / "mvtec" / "bottle")
    for run in ("bottle", "bottle_tiny"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "ckpt.pt").write_bytes(b"another run")
    monkeypatch.chdir(tmp_path)
    assert fm.main(["train", "--data", "mvtec/bottle", "--preset", "tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--out runs/bottle_tiny2" in err and "--resume runs/bottle" in err


def test_score_without_an_alarm_rate_says_how_to_get_decisions(trained, mvtec, tmp_path, capsys):
    argv = ["score", "--ckpt", str(trained), str(mvtec / "weave" / "test" / "good"), "--category", "weave",
            "-K", "1", "-T", "1", "--device", "cpu"]
    assert fm.main([*argv, "--out", str(tmp_path / "a")]) == 0
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"calibrate --ckpt {trained}" in hint and "--alarm-rate 0.01" in hint


def test_the_explain_narrative_quotes_the_committed_figures_numbers():
    """Every number docs/outputs.md quotes on docs/explain.png is that of docs/explain.json, as
    rounded in the text; and its explain command writes outside the repository's files."""
    import json

    from conftest import ROOT

    text = " ".join((ROOT / "docs" / "outputs.md").read_text().split())
    command = re.search(r"python flow_mismatch\.py explain [^`]*?--out (\S+)", text)[1]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert not command.startswith("docs/") and command.split("/")[0] + "/" in ignored
    story = text[text.index("In this figure the late times"):text.index("These numbers are in `docs/explain.json`")]
    d = json.loads((ROOT / "docs" / "explain.json").read_text())
    times, spread = d["times"], d["spread"]
    late, share = re.search(r"t ≥ ([\d.]+) gives (\d+) % of H", story).groups()
    assert round(100 * sum(r["share_of_H"] for r in times if r["t"] >= float(late) - 0.005)) == int(share)
    avg = [f"{times[j]['mean'] / times[j]['w']:.2f}" for j in (0, -1)]
    peak = [f"{times[j]['at_peak'] / times[j]['w']:.0f}" for j in (0, -1)]
    assert f"from {avg[0]} to {avg[1]} on average over the image and from {peak[0]} to {peak[1]} at the peak" in story
    low, mean = spread[d["aggregator"]], spread["mean"]
    assert (f"At t = {spread['t']:.2f} the min over paths keeps {100 * low['at_peak'] / mean['at_peak']:.0f} % of the "
            f"mean's value at the peak ({low['at_peak']:.0f} of {mean['at_peak']:.0f})") in story
    assert f"({low['mean']:.2f} of {mean['mean']:.2f})" in story
    inside, outside = d["heat_in_mask"]["inside"], d["heat_in_mask"]["outside"]
    assert f"H averages {inside:.1f} inside the mask and {outside:.2f} outside" in story

