"""After the first step nothing compiles again: not the train step, not the evaluation, not the host-side logging."""

import collections
import logging

import jax

from gpt_jax import config as config_lib
from gpt_jax import train


class _CompileLog(logging.Handler):
    """Collects the names of the computations JAX compiles while `jax.log_compiles()` is on."""

    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


def _compiles_during_training(workdir, steps: int) -> collections.Counter:
    config = config_lib.base_config()
    config.train_steps, config.batch_size, config.seq_len = steps, 4, 16
    # evaluate, log and checkpoint at (nearly) every step, and over the whole validation split at the end
    config.eval_every, config.eval_steps, config.log_every, config.checkpoint_every = 1, 2, 1, 2
    config.model.n_layer, config.model.n_head, config.model.d_model = 1, 2, 16
    config.sample.max_new_tokens = 0
    handler = _CompileLog()
    loggers = [logging.getLogger(name) for name in ("jax._src.interpreters.pxla", "jax._src.dispatch")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with jax.log_compiles():
            train.train_and_evaluate(config, str(workdir))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return collections.Counter(handler.names)


def test_nothing_recompiles_after_the_first_step(tmp_path):
    # A first run fills JAX's caches of op-by-op computations (shared by every later run in this process);
    # each run builds its own jitted train and eval steps, so those compile once per run.
    _compiles_during_training(tmp_path / "warm", 1)
    two = _compiles_during_training(tmp_path / "two", 2)
    five = _compiles_during_training(tmp_path / "five", 5)
    assert two["jit(train_step)"] == 1 and two["jit(eval_step)"] == 1, two
    # three more steps, evaluations, log lines and checkpoints compile nothing more
    assert five == two, (five, two)
    assert set(five.values()) == {1}, five
