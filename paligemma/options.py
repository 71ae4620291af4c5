"""The allowed values of the options that the library and the `paligemma` command share, each
list written once.

This module imports nothing, so the command line builds its parser from it without loading
NumPy or JAX (`paligemma --help` stays instant), and the library modules that own each choice
take their list from here:

    IMPLS, DTYPES, FAST_DTYPES, PREPROCESS   paligemma.fast.pipeline (PaliGemma.load / generate)
    PREPROCESS                               paligemma.ref.inputs.image.METHODS
    TASKS                                    paligemma.ref.tasks.scoring.TASKS (evaluate, fine-tuning's eval)
    CONVENTIONS                              paligemma.ref.tasks.answers.CONVENTIONS (loc de-quantisation)
    QUANT_FORMATS, SCALE_DTYPES              paligemma.ref.quant.FORMATS, SCALE_DTYPES' names
    OPTIMIZERS, TRAINABLE, EVAL_TASKS        paligemma.fast.train.OPTIMIZERS, GROUPS' names, EVAL_TASKS
    CHECK_DTYPES                             paligemma.parity.tolerances.STAGE_TOLERANCES' names

A library mapping keyed by one of these lists (GROUPS, SCALE_DTYPES, ...) is checked against it
in tests/test_options.py.
"""

IMPLS = ("fast", "ref")
DTYPES = ("float32", "bfloat16", "float64")
FAST_DTYPES = ("float32", "bfloat16")  # float64 is the reference's gold standard only
PREPROCESS = ("big_vision", "hf")
TASKS = ("caption", "vqa", "vqav2", "chartqa", "detect", "segment")
EVAL_TASKS = ("exact_match",) + TASKS  # fine-tuning's validation metric
CONVENTIONS = ("big_vision", "demo")
QUANT_FORMATS = ("int8", "int4")
SCALE_DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "sgd")
TRAINABLE = ("all", "no-vision", "attention", "lora")
CHECK_DTYPES = ("float32", "bfloat16", "float16", "float64")
