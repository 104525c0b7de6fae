"""ladders.py: every row of every table resolves to the recipe it declares, the tables end at
(or centre on) the scripts, an interrupted ladder continues where it stopped, and the report's
arithmetic; one small ladder end to end on generated data."""
import json

import pytest

import compare
import ladders
from ladders import LADDERS, Ladder, Row, Scale


@pytest.fixture(scope="module")
def resolved():
    return {name: ladders.resolve_rows(ladder) for name, ladder in LADDERS.items()}


def drift(ladder, rows):
    """Rows whose resolved recipe changes other keys than the row declares (or misses one):
    against the row before in an additive ladder, against the script in a one-factor table."""
    base = ladders.base_recipe(ladder)
    bad, before = [], base
    for k, (row, _, recipe) in enumerate(rows):
        against = before if ladder.additive else base
        changed = set(ladders.differences(against, recipe))
        must, may = ladders.expected_keys(row.changes, against)
        if not must <= changed <= must | may:
            bad.append((k, sorted(changed ^ must)))
        before = recipe
    return bad


@pytest.mark.parametrize("name", list(LADDERS))
def test_every_row_changes_exactly_the_keys_it_declares(name, resolved):
    assert drift(LADDERS[name], resolved[name]) == []


def test_a_drifting_key_is_caught():
    """train_rs.py's Table 8 values come with the model: a row that switches to resnetrs101
    without declaring its 192 px changes more than it says."""
    ladder = Ladder("t", "train_rs.py", ["--model", "resnetrs200"], True, "x", "rs",
                    [Row("RS-200", {}, 1.0), Row("RS-101", dict(model="resnetrs101"), 2.0)],
                    None, [])
    assert drift(ladder, ladders.resolve_rows(ladder))[0][0] == 1


def test_the_tables_end_at_or_centre_on_the_scripts(resolved):
    same = lambda script, recipe, argv=(): ladders.differences(  # noqa: E731
        compare.resolved_recipe(script, list(argv)), recipe) == {}
    assert same("train_tv.py", resolved["tv-blog"][-1][2])
    assert [row.published for row, _, _ in resolved["tv-blog"]][::12] == [76.130, 80.858]
    rs = resolved["rs-table1"]
    assert same("train_rs.py", rs[-1][2], ["--model", "resnetrs200"])
    assert (rs[-1][2]["train_size"], rs[-1][2]["drop_path"], rs[-1][2]["auto_augment"]) == \
        (256, 0.1, "rand-m15-n2-mmax15")  # Table 8's RS-200 row
    assert rs[0][2]["model"] == "resnet200" and rs[9][2]["model"] == "seresnet200_rs"
    assert [row.published for row, _, _ in rs][::10] == [79.0, 83.4]
    assert same("train_a2.py", resolved["rsb-table6"][5][2])  # the highlighted row
    assert len(resolved["rsb-table6"]) == 22 and len(resolved["tv-blog"]) == 13
    for p, defaults in (("a1", (1, 4)), ("a2", (1, 3)), ("a3", (0, 3))):  # Table 7's blue cells
        rows = resolved[f"rsb-table7-{p}"]
        assert [k for k, (_, _, r) in enumerate(rows) if same(f"train_{p}.py", r)] == \
            list(defaults)
        assert same(f"train_{p}.py", resolved[f"rsb-table9-{p}"][2][2])  # crop 0.95
    assert [r["eval_resize"] for _, _, r in resolved["rsb-table9-a1"]] == [256, 248, 235, 224]


def test_list_and_show_name_every_table(capsys):
    ladders.main(["list"])
    out = capsys.readouterr().out
    for name in ("tv-blog", "rs-table1", "rs-table2", "rsb-table6", "rsb-table7-a3",
                 "rsb-table8", "rsb-table9-a2"):
        assert name in out
    ladders.main(["show", "tv-blog"])
    out = capsys.readouterr().out
    assert "wd_groups: tv -> all" in out and "[evaluation only]" in out
    assert "eval_resize: 256 -> 232" in out


def test_scaled_rows_keep_the_ladders_shape():
    """--epochs-scale 0.05 --size-scale 1/7 -- --batch-size 64: 90 and 600 epochs -> 4 (at
    least 1) and 30, 224 / 176 px -> 32 / 25, resize 256 / 232 -> 37 / 33, each row's lr
    scaled linearly from its own batch."""
    scale = Scale(dict(batch_size=64, model="resnet18"), 0.05, 1 / 7)
    rows = ladders.resolve_rows(LADDERS["tv-blog"], scale)
    r = [recipe for _, _, recipe in rows]
    assert [r[0]["epochs"], r[3]["epochs"], r[0]["decay_epochs"], r[1]["warmup_epochs"]] == \
        [4, 30, 2, 1]
    assert (r[0]["train_size"], r[9]["train_size"], r[9]["eval_size"]) == (32, 25, 32)
    assert (r[0]["eval_resize"], r[11]["eval_resize"]) == (37, 33)
    assert (r[0]["lr"], r[1]["lr"]) == (pytest.approx(0.1 * 64 / 256), pytest.approx(0.5 / 16))
    assert all(x["model"] == "resnet18" and x["batch_size"] == 64 for x in r)
    assert "epochs 600 -> 30" in ladders.scale_note(LADDERS["tv-blog"], scale)


def small_ladder():
    return Ladder("small", "train_tv.py", [], True, "Acc@1", "blog", [
        Row("base", dict(epochs=1, warmup_epochs=0, repeated_aug=0, ema_decay=None), 50.0),
        Row("+ smoothing", dict(label_smoothing=0.2), 52.0),
        Row("+ resize", dict(eval_resize=40), 53.0, eval_only=True),
        Row("+ mixup", dict(mixup=0.0, cutmix=0.0), 51.0)], None, [])


def test_an_interrupted_ladder_continues_without_redoing_finished_runs(tmp_path, monkeypatch):
    """The runner stops at the first failure (here row 1, seed 0); the same command then
    skips row 0's finished runs, resumes row 1 and goes on; an evaluation row waits for its
    trained row and is skipped once it has its eval-model.json."""
    monkeypatch.setitem(LADDERS, "small", small_ladder())
    calls, fail = [], {"row01-seed0"}

    def fake(step):
        folder, cmd = step.folder, step.cmd
        calls.append(folder.name)
        if folder.name in fail:
            return 75  # stopped by a signal, say
        folder.mkdir(parents=True, exist_ok=True)
        if step.weights:
            (folder / f"eval-{step.weights}.json").write_text(json.dumps(dict(top1=60.0)) + "\n")
        else:
            epochs = int(cmd[cmd.index("--epochs") + 1])
            (folder / "summary.json").write_text(json.dumps(dict(epochs=epochs)))
            (folder / "last.pth").write_bytes(b"")
        return 0
    monkeypatch.setattr(ladders, "run_command", fake)
    argv = ["run", "small", "--data", str(tmp_path), "--seeds", "2", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match="row 1|row01"):
        ladders.main(argv)
    assert calls == ["row00-seed0", "row00-seed1", "row01-seed0"]
    calls.clear()
    fail.clear()
    ladders.main(argv)
    assert calls == ["row01-seed0", "row01-seed1", "row02-seed0", "row02-seed1",
                     "row03-seed0", "row03-seed1"]
    calls.clear()
    ladders.main(argv)
    assert calls == []
    # an evaluation row alone, before its trained row has a checkpoint: one line says so
    with pytest.raises(SystemExit, match="row01-seed0 has no checkpoint yet"):
        ladders.main(["run", "small", "--data", str(tmp_path), "--rows", "2", "--out",
                      str(tmp_path / "other")])


def fake_run(folder, top1, ema=None, epochs=3):
    folder.mkdir(parents=True)
    rows = [dict(epoch=e, top1=t, **({"ema_top1": ema[e]} if ema else {}))
            for e, t in enumerate(top1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_arithmetic_on_fabricated_runs(tmp_path):
    """The blog's protocol: best of the seeds at the best epoch (the EMA's where the row has
    one); RSB's: seed 0's final epoch; RS's: the mean of the finals; increments against the
    row before (additive) or the reference row (one-factor); a run not finished counts not."""
    out = tmp_path / "runs"
    blog = Ladder("b", "train_tv.py", [], True, "Acc@1", "blog", [
        Row("r0", dict(epochs=3, ema_decay=None), 70.0),
        Row("r1", dict(ema_decay=0.99998), 72.5)], None, [])
    fake_run(out / "row00-seed0", [50, 60, 55])
    fake_run(out / "row00-seed1", [52, 58, 57])
    fake_run(out / "row01-seed0", [50, 61, 59], ema=[40, 50, 64])
    fake_run(out / "row01-seed1", [50, 62], ema=[40, 70])  # 2 of 3 epochs: not finished
    table = ladders.report_table(blog, out)
    assert table[0][2:7] == [70.0, 60, 59, pytest.approx(2 ** 0.5), 2]
    assert table[1][3] == 64 and table[1][6] == 1  # the EMA's best; seed 1 unfinished
    assert table[1][7] == pytest.approx(2.5) and table[1][8] == pytest.approx(4.0)
    assert ladders.report_table(blog, out, weights="model")[1][3] == 61  # the plain best
    rsb = blog._replace(protocol="rsb", additive=False, reference=0, rows=[
        Row("a", dict(epochs=3, ema_decay=None), 1.0),
        Row("b", dict(epochs=3, ema_decay=None, lr=1.0), 3.0)])
    fake_run(out / "row01-seed2", [10, 20, 30])
    table = ladders.report_table(rsb, out)
    assert table[0][3:5] == [55, 56]  # seed 0's final; the mean of 55 and 57
    assert table[1][3:5] == [59, 44.5] and table[1][7:9] == [2.0, 4]
    rs = rsb._replace(protocol="rs")
    assert ladders.report_table(rs, out)[0][3] == 56
    text = ladders.report_markdown(ladders.report_table(rs, out))
    assert "| 0 | a | 1.00 | 56.00 | 56.00 +- 1.41 (2) |  |  |" in text


def test_rows_with_one_recipe_share_their_runs(tmp_path):
    """Table 7's default cells (A1: drop 0.05 and smoothing on) are one run."""
    steps = ladders.plan(LADDERS["rsb-table7-a1"], tmp_path, tmp_path, range(5), [0])
    assert [step.folder.name for step in steps] == [
        "row00-seed0", "row01-seed0", "row02-seed0", "row03-seed0"]


def test_a_small_ladder_end_to_end(tiny_data, tmp_path, monkeypatch, capsys):
    """run + report on generated data with the real scripts, rows 0-2: two trained rows of one
    epoch and an evaluation row on the second row's checkpoint; row 3 is reported not run."""
    monkeypatch.setitem(LADDERS, "small", small_ladder())
    out = tmp_path / "runs"
    ladders.main(["run", "small", "--data", str(tiny_data), "--seeds", "1", "--out", str(out),
                  "--rows", "0-2",
                  "--", "--model", "resnet18", "--train-size", "24", "--eval-size", "32",
                  "--batch-size", "16", "--workers", "0", "--quiet"])
    assert sorted(p.name for p in out.iterdir()) == ["ladder.json", "row00-seed0",
                                                     "row01-seed0", "row02-seed0"]
    evaluated = json.loads((out / "row02-seed0" / "eval-model.json").read_text())
    assert evaluated["eval_resize"] == 40 and evaluated["checkpoint"].endswith(
        "row01-seed0/last.pth")
    capsys.readouterr()
    ladders.main(["report", "small", str(out), "--plot", str(tmp_path / "small.png")])
    text = capsys.readouterr().out
    assert (tmp_path / "small.png").stat().st_size > 1000  # matplotlib: requirements-extra
    assert "scaled down" in text and "| 3 | + mixup | 51.00 |  | not run |" in text
    assert text.count("(1) |") == 3  # every row run has its one seed
    with pytest.raises(ladders.common.UserError, match="holds runs of small, not tv-blog"):
        ladders.main(["report", "tv-blog", str(out)])
