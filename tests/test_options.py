"""Each option list written once (paligemma/options.py): the library's lists are those lists,
its mappings are keyed by them, and the command line offers exactly them without loading NumPy."""

import argparse
import subprocess
import sys

from paligemma import options
from paligemma.cli.main import build_parser
from paligemma.fast import pipeline, train
from paligemma.parity import tolerances
from paligemma.ref import quant
from paligemma.ref.inputs import image
from paligemma.ref.tasks import answers, scoring


def test_the_library_takes_its_lists_from_options():
    assert pipeline.IMPLS is options.IMPLS and pipeline.PREPROCESS_METHODS is options.PREPROCESS
    assert image.METHODS is options.PREPROCESS and scoring.TASKS is options.TASKS
    assert answers.CONVENTIONS is options.CONVENTIONS and quant.FORMATS is options.QUANT_FORMATS
    assert train.OPTIMIZERS is options.OPTIMIZERS and train.EVAL_TASKS is options.EVAL_TASKS


def test_the_librarys_mappings_are_keyed_by_the_lists():
    assert tuple(pipeline.DTYPES) == options.DTYPES
    assert tuple(quant.SCALE_DTYPES) == options.SCALE_DTYPES
    assert tuple(train.GROUPS) == options.TRAINABLE
    assert sorted(tolerances.STAGE_TOLERANCES) == sorted(options.CHECK_DTYPES)


def _choices(parser, command, flag, sub=None):
    actions = {a.dest: a for a in parser._actions}  # argparse keeps subcommands in one action
    sub_parser = actions["command"].choices[command]
    if sub is not None:
        sub_parser = next(a for a in sub_parser._actions if isinstance(a, argparse._SubParsersAction)).choices[sub]
    return tuple(next(a for a in sub_parser._actions if flag in a.option_strings).choices)


def test_the_command_line_offers_the_same_lists():
    parser = build_parser()
    expected = {("generate", "--impl"): options.IMPLS, ("generate", "--dtype"): options.DTYPES,
                ("generate", "--preprocess"): options.PREPROCESS, ("generate", "--quantize"): options.QUANT_FORMATS,
                ("generate", "--convention"): options.CONVENTIONS, ("evaluate", "--task"): options.TASKS,
                ("evaluate", "--impl"): options.IMPLS, ("quantize", "--format"): options.QUANT_FORMATS,
                ("quantize", "--scale-dtype"): options.SCALE_DTYPES, ("finetune", "--trainable"): options.TRAINABLE,
                ("finetune", "--optimizer"): options.OPTIMIZERS, ("finetune", "--dtype"): options.FAST_DTYPES,
                ("finetune", "--eval-task"): options.EVAL_TASKS}
    for (command, flag), values in expected.items():
        assert _choices(parser, command, flag) == values, (command, flag)
    assert _choices(parser, "parity", "--dtype", sub="check") == options.CHECK_DTYPES


def test_the_command_line_imports_neither_numpy_nor_jax():
    code = "import sys, paligemma.cli.main as m; m.build_parser(); print(sorted({'numpy', 'jax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
