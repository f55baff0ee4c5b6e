"""Train a MODEL1 replica.

  python train.py                                   # tiny default, CPU, minutes
  python train.py --config=configs/tiny_v32.py --workdir=runs/v32 --config.train.steps=200
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py --workdir=runs/tiny_8dev \
      --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2

``--workdir`` defaults to ``runs/<config name>``; an existing checkpoint there is resumed
(only with a compatible config; the directory is locked while a trainer runs).
Multi-host: run the same command on every host with ``--multihost`` (calls
``jax.distributed.initialize()``; see README).

Exit codes: 0 done, 2 bad input (one ``error:`` line; ``--debug`` for the traceback),
1 the run failed, 75 preempted (SIGTERM/SIGINT; a checkpoint was saved: rerun to resume).
"""
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (get_config()).")
  flags.DEFINE_string("workdir", None, "Work dir (default runs/<config name>).")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; expected only --flags")
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize()
  from model1 import cli, trainer
  cfg = FLAGS.config
  out = trainer.run(cfg, FLAGS.workdir or f"runs/{cfg.name}")
  val = f"val_loss {out['val_loss']:.4f}, " if out["val_loss"] is not None else ""
  last = f"loss {out['last_loss']:.4f}, " if out["last_loss"] is not None else ""
  if out["preempted"]:
    print(f"preempted at step {out['step']} after {out['wall_s']:.0f} s; checkpoint in "
          f"{out['workdir']}: rerun the same command to resume", flush=True)
    return cli.EXIT_PREEMPTED
  print(f"done: step {out['step']}, {last}{val}{out['wall_s']:.0f} s, outputs in "
        f"{out['workdir']}", flush=True)
  return 0


if __name__ == "__main__":
  from model1 import cli
  cli.run_main(main, define_flags)
