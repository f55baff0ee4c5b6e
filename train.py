"""Train a MODEL1 replica.

  python train.py                                   # tiny default, CPU, minutes
  python train.py --config=configs/tiny_v32.py --workdir=runs/v32 --config.train.steps=200
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py \
      --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2

``--workdir`` defaults to ``runs/<config name>``; an existing checkpoint there is resumed.
Multi-host: run the same command on every host with ``--multihost`` (calls
``jax.distributed.initialize()``; see README).
"""
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (get_config()).")
flags.DEFINE_string("workdir", None, "Work dir (default runs/<config name>).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize()
  from model1 import trainer
  cfg = FLAGS.config
  summary = trainer.run(cfg, FLAGS.workdir or f"runs/{cfg.name}")
  print(f"done: {summary}")


if __name__ == "__main__":
  app.run(main)
