"""The load-test options are declared once (loadtests/options.py) and every parser reads them alike."""

import argparse

import pytest

from loadtests.options import LoadOptions, add_load_arguments

pytestmark = pytest.mark.fast  # pure logic: `make test-fast`


def test_every_parser_takes_the_options_with_their_one_default():
    from loadtests import faults, runner

    parsed = argparse.ArgumentParser()
    runner.add_arguments(parsed)
    assert LoadOptions.from_args(parsed.parse_args([])) == LoadOptions()
    chaos = argparse.ArgumentParser()
    faults.add_arguments(chaos)
    args = chaos.parse_args([])
    assert (args.data_dir, args.seed) == (LoadOptions().data_dir, LoadOptions().seed)


def test_the_locust_command_line_parses_back_to_the_same_options():
    opts = LoadOptions(shape="replay", duration_s=30.0, trace="t.csv", protocol="grpc", task="rerank", candidates=50,
                       query_share=1.0, seed=7)
    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    assert LoadOptions.from_args(parser.parse_args(opts.locust_args())) == opts


def test_the_locustfiles_parser_reads_the_runners_command_line():
    from loadtests.options import add_locust_arguments

    opts = LoadOptions(shape="step", duration_s=40.0, shape_kw="steps=3", protocol="mixed", max_users=50, seed=3)
    parser = argparse.ArgumentParser()
    add_locust_arguments(parser)
    args = parser.parse_args(opts.locust_args() + ["--capacity-rps", "12.5", "--retry-on-shed", "after"])
    assert LoadOptions.from_args(args) == opts
    assert (args.capacity_rps, args.retry_on_shed, args.grpc_share) == (12.5, "after", 0.5)


def test_shape_kw_reads_numbers_none_and_words():
    from loadtests.options import shape_kwargs

    assert shape_kwargs("steps=3, peak_frac=2.5,base_frac=-0.5,trace=none,interpolation=step") == {
        "steps": 3, "peak_frac": 2.5, "base_frac": -0.5, "trace": None, "interpolation": "step"}
    assert shape_kwargs("") == {}
    with pytest.raises(ValueError, match="key=value"):
        shape_kwargs("steps")
