"""Evaluate a trained run: loss, long-context retrieval, loss by position; sample text.

  python eval.py --workdir=runs/tiny                       # loss + sample (mode all)
  python eval.py --workdir=runs/tiny --mode=sample --prompt="def fib(n):" \\
      --temperature=0.8 --top_p=0.95 --cache_format=fp8
  python eval.py --workdir=runs/tiny --mode=passkey --lengths=64,128,256 --n_trials=64
  python eval.py --workdir=runs/tiny --mode=mqar --lengths=64,128
  python eval.py --workdir=runs/tiny --mode=position       # does loss keep falling?

Loads the latest checkpoint in ``--workdir`` onto the current devices (any mesh shape).
The logic lives in ``model1.evals`` (tables and numbers); this file only wires flags.
Results are printed (markdown tables) and written to ``<workdir>/eval.json``.
"""
import json
import math
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file; default: the run's own config.")
flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.", required=True)
flags.DEFINE_enum("mode", "all", ["all", "loss", "sample", "passkey", "mqar", "position"],
                  "What to evaluate (all = loss + sample).")
flags.DEFINE_integer("eval_batches", 16, "Validation batches for loss / position.")
flags.DEFINE_string("prompt", "def main():\n", "Prompt for --mode=sample.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to sample.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_enum("cache_format", "bf16", ["bf16", "fp8"], "KV cache format for sampling.")
flags.DEFINE_enum("impl", "auto", ["auto", "xla", "pallas"],
                  "Attention implementation for sampling: auto = the Pallas kernels on a "
                  "GPU, the XLA reference elsewhere.")
flags.DEFINE_string("lengths", "", "passkey/mqar: comma-separated context lengths "
                    "(default: 1/4, 1/2 and all of model.max_seq_len).")
flags.DEFINE_integer("n_trials", 64, "passkey/mqar: examples per length.")
flags.DEFINE_string("buckets", "", "position: comma-separated bucket edges "
                    "(default 0,1,2,4,...,seq_len).")
FLAGS = flags.FLAGS


def load_run_config(workdir: Path):
  from model1.evals import load_run_config as load
  try:
    return load(workdir)
  except ValueError as e:
    raise ValueError(f"--workdir={workdir}: {e} (or pass --config)") from None


def main(argv):
  del argv
  from model1 import (checkpoint, config, data, evals, generate, long_context, sharding,
                      trainer)
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
  mapping = trainer.engram_mapping(mcfg, ds)
  result = {"step": step, "mode": FLAGS.mode}
  if FLAGS.mode in ("all", "loss"):
    with sharding.use_mesh(mesh):
      loss = trainer.evaluate(model, ds, mesh, FLAGS.eval_batches, mapping)
    bpt = ds.bytes_per_token()
    result.update(val_loss=loss, perplexity=math.exp(loss),
                  bits_per_byte=loss / math.log(2) / bpt, bytes_per_token=bpt)
    print(f"step {step}: val_loss {loss:.4f}  perplexity {math.exp(loss):.2f}  "
          f"bits/byte {result['bits_per_byte']:.4f}")
  if FLAGS.mode == "position":
    edges = [int(x) for x in FLAGS.buckets.split(",")] if FLAGS.buckets else None
    with sharding.use_mesh(mesh):
      res = evals.position_loss(model, ds, mapping, FLAGS.eval_batches, edges)
    result["position"] = res
    print(f"step {step}: validation loss by position in the document\n"
          + evals.position_markdown(res))
  if FLAGS.mode in ("passkey", "mqar"):
    L = mcfg.max_seq_len
    lengths = ([int(x) for x in FLAGS.lengths.split(",")] if FLAGS.lengths
               else [L // 4, L // 2, L])
    tv = long_context.TaskVocab(mcfg.vocab_size)
    with sharding.use_mesh(mesh):
      rows = evals.long_context_accuracy(model, FLAGS.mode, lengths, FLAGS.n_trials, tv,
                                         mapping)
    result["accuracy"] = rows
    print(f"step {step}: {FLAGS.mode} accuracy\n" + evals.accuracy_markdown(rows))
  if FLAGS.mode in ("all", "sample"):
    ids = ds.tokenizer.encode_batch([FLAGS.prompt])[0]
    eos = data.SPECIAL_TOKENS.index("<|eos|>")
    s = generate.SamplingConfig(max_new_tokens=FLAGS.max_new_tokens,
                                temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                                stop_tokens=(eos,))
    with sharding.use_mesh(mesh):
      gen = generate.generate(model, [ids], s, cache_format=FLAGS.cache_format,
                              impl=FLAGS.impl, mapping=mapping)
    text = ds.tokenizer.decode(gen.tokens[0])
    result.update(sample=FLAGS.prompt + text, impl=gen.impl)
    print(f"----- sample (attention impl: {gen.impl}) -----\n" + FLAGS.prompt + text
          + "\n------------------")
  (workdir / "eval.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
