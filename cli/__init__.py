"""The `paligemma` command line (installed as `paligemma.cli`; entry point `paligemma.cli.main:main`).

    paligemma generate --checkpoint model.npz --tokenizer tok.model --image cat.jpg --prompt "caption en"
    python -m paligemma.cli.main generate ...        # the same, without the console script

Nothing is imported here, so `python -m paligemma.cli.main` runs `main` only once.
"""
