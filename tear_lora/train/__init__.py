"""Training: the base in 4-bit + LoRA + trainable token rows, the span loss, TearTrainer and the run around it.

model, loss, batch, trainer (TearTrainer), distributed, speed, runner (one training run end to end), workdir
(resume), plan and shape (memory plan before a run).
May import: data/ and the root modules below it (recipe, metadata, rundir). Never study/ or release/.
`tear_lora.train.run` is the public entry point; it is loaded on first use so that importing a train module
(e.g. loss, for evaluation) does not import TRL.
"""


def __getattr__(name):
    if name == "run":
        from .runner import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
