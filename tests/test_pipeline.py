import json
import re

import pytest
from click.testing import CliRunner

from featx import pipeline as pipeline_mod
from featx.cli import cli
from featx.errors import FeatxError
from featx.pipeline import find_pipeline, load_pipeline, run_pipeline, shipped_pipelines
from helpers import REPO

PIPELINE = """
name = "tiny end to end"
data = "{data}"
backbone = "{backbone}"

[[steps]]
name = "extract"
kind = "extract"

[[steps]]
name = "logreg"
kind = "fit-head"
clf = "logreg"
seed_figure = 0.9

[[steps]]
name = "fine-tune block2 from the logreg head"
kind = "finetune"
unfreeze = "block2"
head_from = "logreg"
epochs = 3

[[steps]]
name = "head from the classifier's own rows"
kind = "finetune"
unfreeze = "none"
head = "imagenet:3,-"
"""


def test_pipeline_runs_end_to_end(tiny, dataset, tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE.format(data=dataset, backbone=tiny))
    result = run_pipeline(path, cache_dir=tmp_path / "c", out=tmp_path / "report", max_epochs=1, progress=False)
    steps = {s["step"]: s for s in result["steps"]}
    assert steps["logreg"]["accuracy"] == 1.0 and steps["logreg"]["seed_figure"] == 0.9
    assert steps["fine-tune block2 from the logreg head"]["split"] == "test"
    assert steps["head from the classifier's own rows"]["split"] == "test"
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert "| logreg | tiny | test | 1.0000 | 1.0000 | 0.9 |" in table
    assert json.loads((tmp_path / "report" / "results.json").read_text())["max_epochs"] == 1
    assert (tmp_path / "report" / "fine_tune_block2_from_the_logreg_head" / "curves_loss.svg").exists()


@pytest.mark.parametrize("body,message", [
    ('name="x"\ndata="d"\ncolour="red"\nsteps=[]', "unknown key 'colour'"),
    ('name="x"\ndata="d"\n[[steps]]\nname="a"\nkind="fit-head"\nclf="svm"\nepochs=3', "unknown key 'epochs' for a fit-head"),
    ('name="x"\ndata="d"\n[[steps]]\nname="a"\nkind="train"', "kind must be one of"),
    ('name="x"\ndata="d"\n[[steps]]\nname="a"\nkind="finetune"', "missing 'unfreeze'"),
    ('name="x"\ndata="d"\n[[steps]]\nname="a"\nkind="finetune"\nunfreeze="all"\nhead_from="b"', "names no earlier"),
    ('name="x"\ndata="d"\n[[steps]]\nname="a"\nkind="fit-head"\nclf="svm"\n[[steps]]\nname="b"\nkind="finetune"\n'
     'unfreeze="all"\nhead_from="a"\nhead="imagenet:1,2"', "or head_from, not both"),
    ('name="x"\nsteps=[]', "missing 'data'"),
    ('name = ', "is not valid TOML"),
])
def test_schema_errors_name_file_and_step(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(FeatxError, match=message) as err:
        load_pipeline(path)
    assert "bad.toml" in str(err.value)


def test_shipped_pipelines_validate():
    files = sorted((REPO / "pipelines").glob("*.toml"))
    assert {f.stem for f in files} >= {"quickstart", "s0_hotdog", "s1_pizza_steak_sushi", "s2_hymenoptera",
                                       "s3_cats_dogs", "s4_caltech256"}
    for f in files:
        spec = load_pipeline(f)
        assert spec["steps"]
        if f.stem != "quickstart":
            assert spec["seed_backbone"] and any("seed_figure" in s for s in spec["steps"])


def test_shipped_pipelines_run_by_name(monkeypatch):
    assert shipped_pipelines() == {f.stem: f for f in sorted((REPO / "pipelines").glob("*.toml"))}
    assert find_pipeline("s2_hymenoptera") == find_pipeline("s2_hymenoptera.toml") == \
        REPO / "pipelines" / "s2_hymenoptera.toml"
    with pytest.raises(FeatxError, match=r"pipeline nope does not exist: .*\(quickstart, s0_hotdog, "):
        find_pipeline("nope")
    seen = []

    def stop(path, **kwargs):
        seen.append(path)
        raise FeatxError("stopped before running")

    monkeypatch.setattr(pipeline_mod, "run_pipeline", stop)
    res = CliRunner().invoke(cli, ["demo", "--quiet"])
    assert "stopped before running" in str(res.exception)
    assert [find_pipeline(p) for p in seen] == [REPO / "pipelines" / "quickstart.toml"]


def test_absent_dataset_fails_at_start(tmp_path):
    res = CliRunner().invoke(cli, ["run", str(REPO / "pipelines" / "s0_hotdog.toml"), "--data-root", str(tmp_path)])
    assert isinstance(res.exception, FeatxError) and "hotdog.zip" in str(res.exception)
    assert not (tmp_path / "hotdog").exists()


@pytest.mark.parametrize("body,message", [
    ('steps = 5', "'steps' must be one or more"),
    ('steps = ["a"]', "'steps' must be one or more"),
    ('[[steps]]\nname = "x"\nkind = "finetune"\nunfreeze = "none"\nepochs = "two"', "'epochs' must be a whole number >= 1, not 'two'"),
    ('[[steps]]\nname = "x"\nkind = "extract"\nbatch_size = -4', "'batch_size' must be a whole number >= 1, not -4"),
    ('[[steps]]\nname = "x"\nkind = "finetune"\nunfreeze = "none"\nlr = nan', "'lr' must be a number > 0, not nan"),
    ('[[steps]]\nname = "x"\nkind = "finetune"\nunfreeze = "none"\nfrom_scratch = 1', "'from_scratch' must be true or false"),
    ('[[steps]]\nname = 3\nkind = "extract"', "'name' must be text, not 3"),
])
def test_pipeline_values_are_checked_with_one_line(tmp_path, body, message):
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\ndata = "digits"\n{body}\n')
    with pytest.raises(FeatxError, match=re.escape(message)):
        load_pipeline(path)


def test_a_pipeline_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "p.toml").write_bytes(b'name = "caf\xe9"\ndata = "digits"\n')
    with pytest.raises(FeatxError, match="is not UTF-8 text"):
        load_pipeline(tmp_path / "p.toml")


def test_input_size_is_checked_in_the_api(tiny, dataset, tmp_path):
    import featx
    for size in (-5, 0):
        with pytest.raises(FeatxError, match=f"--input-size {size}: must be a whole number"):
            featx.extract(tiny, str(dataset), cache_dir=tmp_path, input_size=size, progress=False)


def test_a_finetune_step_without_head_starts_fresh_even_after_a_fit_head(tiny, dataset, tmp_path, monkeypatch):
    """A pipeline does what its file says: the workspace's last fit-head must not leak into a later step."""
    from featx.modelfile import ModelFile

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\ndata = "{dataset}"\nbackbone = "{tiny}"\n'
                    '[[steps]]\nname = "head"\nkind = "fit-head"\nclf = "logreg"\n'
                    '[[steps]]\nname = "fresh"\nkind = "finetune"\nunfreeze = "none"\nepochs = 1\n')
    run_pipeline(path, out=tmp_path / "report", progress=False)
    assert ModelFile.load(tmp_path / "report" / "fresh" / "model.featx").info["finetune"]["head"] is None
