"""Runs that differ only in hyperparameters reuse the compiled flax programs.

The step once baked the LR table (its length = the run's horizon) into the program, so every
change of --max_train_steps, learning rate, schedule or warm-up compiled the step again, even
with a warm persistent cache: minutes of a pod at real size. Here two fresh processes of the
real script share one --compile_cache_dir; the second changes every hyperparameter the step
reads and resumes the first with a longer horizon, and must compile nothing (jax's own
explanation of persistent-cache misses, JAX_EXPLAIN_CACHE_MISSES, counts them) and compile the
step from the program the first one stored (flax_kandinsky.training.stored_step), untraced.
"""

from __future__ import annotations

import re

from tests.helpers import run_script, script_env, train_args

PRIOR = "train_text_to_image_prior.py"
MISS = re.compile(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)'")


def test_hyperparameter_changes_and_a_longer_resume_compile_nothing(
    tiny_folders, sample_dataset, tmp_path
):
    prior, decoder = tiny_folders
    env = dict(script_env(), JAX_EXPLAIN_CACHE_MISSES="1")
    flags = dict(
        backend="flax",
        report_to="none",
        compile_cache_dir=tmp_path / "jax_cache",
        checkpointing_steps=2,
        snr_gamma=5.0,
    )
    out = tmp_path / "run"
    first = run_script(PRIOR, *train_args(prior, decoder, sample_dataset, out, **flags), env=env)
    compiled = MISS.findall(first.stderr)
    assert "jit_train_step" in compiled, compiled  # the cache started empty
    steps = tmp_path / "jax_cache" / "kandinsky_steps"
    (stored,) = steps.glob("*.jaxexport")
    written = stored.stat().st_mtime_ns

    flags.update(
        resume_from_checkpoint="latest",
        max_train_steps=7,
        learning_rate=3e-4,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        adam_beta1=0.8,
        adam_beta2=0.99,
        adam_epsilon=1e-6,
        adam_weight_decay=0.01,
        max_grad_norm=0.5,
        snr_gamma=3.0,
    )
    second = run_script(PRIOR, *train_args(prior, decoder, sample_dataset, out, **flags), env=env)
    assert "at update 4" in second.stdout
    assert MISS.findall(second.stderr) == []
    assert list(steps.glob("*.jaxexport")) == [stored] and stored.stat().st_mtime_ns == written
