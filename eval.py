"""Evaluate a trained run: loss, long-context retrieval, loss by position; sample text.

  python eval.py --workdir=runs/tiny                       # loss + sample (mode all)
  python eval.py --workdir=runs/tiny --mode=sample --prompt="def fib(n):" \\
      --temperature=0.8 --top_p=0.95 --cache_format=fp8
  python eval.py --workdir=runs/tiny --mode=passkey --lengths=64,128,256 --n_trials=64
  python eval.py --workdir=runs/tiny --mode=mqar --lengths=64,128
  python eval.py --workdir=runs/tiny --mode=position       # does loss keep falling?

Loads the latest checkpoint in ``--workdir`` onto the devices this process has (all of
them on one fsdp axis, whatever mesh trained it), with the run's own tokenizer
(``<workdir>/tokenizer.json``). A corpus whose manifest differs from the run's is refused
unless ``--allow_corpus_change``. The logic lives in ``model1.evals``; this file only
wires flags. Results are printed (markdown tables) and written to one file per mode, so
no mode overwrites another's numbers: ``<workdir>/eval.json`` (loss), ``sample.json``,
``position.json``, ``passkey.json``, ``mqar.json``. Errors: one ``error:`` line, exit 2 (``--debug`` for the
traceback).
"""
import json
import math
from pathlib import Path

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file; default: the run's own config.")
  flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.", required=True)
  flags.DEFINE_enum("mode", "all", ["all", "loss", "sample", "passkey", "mqar", "position"],
                    "What to evaluate (all = loss + sample).")
  flags.DEFINE_integer("eval_batches", 16, "Validation batches for loss / position.")
  flags.DEFINE_string("prompt", "def main():\n", "Prompt for --mode=sample.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to sample.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_enum("cache_format", "bf16", ["bf16", "fp8", "f32"], "KV cache format for sampling.")
  flags.DEFINE_enum("impl", "auto", ["auto", "xla", "pallas"],
                    "Attention implementation for sampling: auto = the Pallas kernels on a "
                    "GPU, the XLA reference elsewhere.")
  flags.DEFINE_string("lengths", "", "passkey/mqar: comma-separated context lengths "
                      "(default: 1/4, 1/2 and all of model.max_seq_len).")
  flags.DEFINE_integer("n_trials", 64, "passkey/mqar: examples per length.")
  flags.DEFINE_bool("allow_corpus_change", False, "Evaluate on a corpus that differs from "
                    "the run's (its manifest.json); loss numbers are then not comparable.")
  flags.DEFINE_string("buckets", "", "position: comma-separated bucket edges "
                      "(default 0,1,2,4,...,seq_len).")


def load_run_config(workdir: Path):
  from model1.evals import load_run_config as load
  try:
    return load(workdir)
  except ValueError as e:
    raise ValueError(f"--workdir={workdir}: {e} (or pass --config)") from None


def _ints(flag: str, text: str) -> list[int]:
  try:
    vals = [int(x) for x in text.split(",")]
  except ValueError:
    raise ValueError(f"--{flag}={text!r}; expected comma-separated ints") from None
  if any(v <= 0 for v in vals):
    raise ValueError(f"--{flag}={text!r}; expected positive ints")
  return vals


def _write(workdir: Path, mode: str, result: dict) -> None:
  name = "eval.json" if mode == "loss" else f"{mode}.json"
  (workdir / name).write_text(json.dumps(dict(result, mode=mode), indent=1))


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}; expected only --flags")
  import jax
  from model1 import (checkpoint, config, data, evals, generate, long_context, sharding,
                      trainer)
  workdir = Path(FLAGS.workdir)
  if not workdir.is_dir():
    raise ValueError(f"--workdir={workdir} does not exist; expected a run directory")
  cfg = FLAGS.config or load_run_config(workdir)
  mcfg = config.model_config_from_dict(cfg.model)
  if not 1 <= FLAGS.max_new_tokens < mcfg.max_seq_len:  # checked again with the prompt
    raise ValueError(f"--max_new_tokens={FLAGS.max_new_tokens}; expected an int in [1, "
                     f"model.max_seq_len={mcfg.max_seq_len})")
  if FLAGS.eval_batches < 1 or FLAGS.n_trials < 1:
    raise ValueError(f"--eval_batches={FLAGS.eval_batches}, --n_trials={FLAGS.n_trials}; "
                     f"expected positive ints")
  # the devices this process has, not the training mesh (which may need more devices)
  mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1, expert=1)
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f"--workdir={workdir} holds no checkpoint; expected a trained run")
    run_tok = workdir / "tokenizer.json"
    ds = trainer.load_dataset(cfg, tokenizer_file=run_tok if run_tok.exists() else None)
    checkpoint.check_corpus(workdir, ds.manifest, FLAGS.allow_corpus_change)
    model, opt = trainer.build_model_and_optimizer(mcfg, cfg.train, mesh, cfg.seed)
    ckpt.restore(step, model, opt, cfg.model.to_dict(), mesh)
  finally:
    ckpt.close()
  mapping = trainer.engram_mapping(mcfg, ds)
  result = {"step": step, "devices": jax.device_count()}
  if FLAGS.mode in ("all", "loss"):
    with sharding.use_mesh(mesh):
      loss = trainer.evaluate(model, ds, mesh, FLAGS.eval_batches, mapping)
    bpt = ds.bytes_per_token()
    res = dict(result, val_loss=loss, perplexity=math.exp(loss),
               bits_per_byte=loss / math.log(2) / bpt, bytes_per_token=bpt)
    _write(workdir, "loss", res)
    print(f"step {step}: val_loss {loss:.4f}  perplexity {math.exp(loss):.2f}  "
          f"bits/byte {res['bits_per_byte']:.4f}")
  if FLAGS.mode == "position":
    edges = _ints("buckets", FLAGS.buckets) if FLAGS.buckets else None
    with sharding.use_mesh(mesh):
      res = evals.position_loss(model, ds, mapping, FLAGS.eval_batches, edges)
    _write(workdir, "position", dict(result, position=res))
    print(f"step {step}: validation loss by position in the document\n"
          + evals.position_markdown(res))
  if FLAGS.mode in ("passkey", "mqar"):
    L = mcfg.max_seq_len
    lengths = _ints("lengths", FLAGS.lengths) if FLAGS.lengths else [L // 4, L // 2, L]
    tv = long_context.TaskVocab(mcfg.vocab_size)
    with sharding.use_mesh(mesh):
      rows = evals.long_context_accuracy(model, FLAGS.mode, lengths, FLAGS.n_trials, tv,
                                         mapping)
    _write(workdir, FLAGS.mode, dict(result, accuracy=rows))
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
    _write(workdir, "sample", dict(result, prompt=FLAGS.prompt, sample=FLAGS.prompt + text,
                                   temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                                   cache_format=FLAGS.cache_format, impl=gen.impl))
    print(f"----- sample (attention impl: {gen.impl}) -----\n" + FLAGS.prompt + text
          + "\n------------------")


if __name__ == "__main__":
  from model1 import cli
  cli.run_main(main, define_flags)
