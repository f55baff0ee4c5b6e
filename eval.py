"""Evaluate a trained run: validation loss, perplexity, bits per byte; sample text.

  python eval.py --workdir=runs/tiny                       # config read from the run
  python eval.py --workdir=runs/tiny --mode=sample --prompt="def fib(n):" \
      --temperature=0.8 --top_p=0.95 --cache_format=fp8

Loads the latest checkpoint in ``--workdir`` onto the current devices (any mesh shape).
"""
import json
import math
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file; default: the run's own config.")
flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.", required=True)
flags.DEFINE_enum("mode", "all", ["all", "loss", "sample"], "What to evaluate.")
flags.DEFINE_integer("eval_batches", 16, "Validation batches for the loss.")
flags.DEFINE_string("prompt", "def main():\n", "Prompt for --mode=sample.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to sample.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_enum("cache_format", "bf16", ["bf16", "fp8"], "KV cache format for sampling.")
flags.DEFINE_enum("impl", "xla", ["xla", "pallas"], "Decode attention implementation.")
FLAGS = flags.FLAGS


def load_run_config(workdir: Path):
  import ml_collections
  prov = workdir / "provenance.json"
  if not prov.exists():
    raise ValueError(f"--workdir={workdir} has no provenance.json; expected a train.py run "
                     f"directory (or pass --config)")
  return ml_collections.ConfigDict(json.loads(prov.read_text())["config"])


def main(argv):
  del argv
  from model1 import checkpoint, config, data, generate, sharding, trainer
  workdir = Path(FLAGS.workdir)
  cfg = FLAGS.config or load_run_config(workdir)
  mcfg = config.model_config_from_dict(cfg.model)
  mesh = sharding.make_mesh(**cfg.mesh.to_dict())
  ckpt = checkpoint.Checkpointer(workdir)
  step = ckpt.latest_step()
  if step is None:
    raise ValueError(f"--workdir={workdir} holds no checkpoint; expected a trained run")
  model, opt = trainer.build_model_and_optimizer(mcfg, cfg.train, mesh, cfg.seed)
  ckpt.restore(step, model, opt, cfg.model.to_dict(), mesh)
  ckpt.close()
  ds = trainer.load_dataset(cfg)
  result = {"step": step}
  if FLAGS.mode in ("all", "loss"):
    with sharding.use_mesh(mesh):
      loss = trainer.evaluate(model, ds, mesh, FLAGS.eval_batches)
    bpt = ds.bytes_per_token()
    result.update(val_loss=loss, perplexity=math.exp(loss),
                  bits_per_byte=loss / math.log(2) / bpt, bytes_per_token=bpt)
    print(f"step {step}: val_loss {loss:.4f}  perplexity {math.exp(loss):.2f}  "
          f"bits/byte {result['bits_per_byte']:.4f}")
  if FLAGS.mode in ("all", "sample"):
    ids = ds.tokenizer.encode_batch([FLAGS.prompt])[0]
    eos = data.SPECIAL_TOKENS.index("<|eos|>")
    s = generate.SamplingConfig(max_new_tokens=FLAGS.max_new_tokens,
                                temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                                stop_tokens=(eos,))
    with sharding.use_mesh(mesh):
      gen = generate.generate(model, [ids], s, cache_format=FLAGS.cache_format,
                              impl=FLAGS.impl)
    text = ds.tokenizer.decode(gen.tokens[0])
    result["sample"] = FLAGS.prompt + text
    print("----- sample -----\n" + FLAGS.prompt + text + "\n------------------")
  (workdir / "eval.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
