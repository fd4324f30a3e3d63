"""The experiment skeleton (loadtests/experiment.py): the steps run in order, and the result JSON, the plots
and the docs section are written once, whatever the experiment."""

import json

import pytest

from loadtests.experiment import Experiment

pytestmark = pytest.mark.fast  # pure logic: `make test-fast`


class Counting(Experiment):
    header = "# Results\n"
    section = "counting"

    def __init__(self, tmp_path, with_targets=True):
        self.out, self.page = tmp_path / "r" / "c.json", tmp_path / "d" / "p.md"
        self.with_targets, self.steps = with_targets, []

    def run(self):
        self.steps.append("run")
        return [1, 2, 3]

    def analyze(self, measured):
        self.steps.append("analyze")
        return {"total": sum(measured)}

    def targets(self, doc):
        self.steps.append("targets")
        return {"total_at_least_6": {"met": doc["total"] >= 6}} if self.with_targets else None

    def plot(self, doc):
        self.steps.append("plot")
        assert json.loads(self.out.read_text()) == doc  # the JSON is on disk before the plots

    def markdown(self, doc):
        self.steps.append("markdown")
        return f"total {doc['total']}"

    def title(self, doc):
        return "Counting"


def test_the_steps_run_in_order_and_write_json_then_plot_then_the_section(tmp_path):
    experiment = Counting(tmp_path)
    doc = experiment.execute()
    assert experiment.steps == ["run", "analyze", "targets", "plot", "markdown"]
    assert doc == {"total": 6, "targets": {"total_at_least_6": {"met": True}}}
    assert json.loads(experiment.out.read_text()) == doc
    page = experiment.page.read_text()
    assert page.startswith("# Results\n") and "## Counting\n\ntotal 6\n<!-- counting:end -->" in page


def test_an_experiment_without_targets_writes_none_and_a_rerun_replaces_its_section(tmp_path):
    Counting(tmp_path).execute()
    doc = Counting(tmp_path, with_targets=False).execute()
    assert "targets" not in doc and "targets" not in json.loads((tmp_path / "r" / "c.json").read_text())
    assert (tmp_path / "d" / "p.md").read_text().count("<!-- counting:start -->") == 1
