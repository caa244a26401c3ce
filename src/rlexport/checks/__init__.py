"""Header-only structure checks of an exported folder, below both `export` (its self-check) and `verify`.

  report.py     Check, passed / failed / skipped: the named results both report
  facts.py      what transformers says about a folder, as data (meta-device parameters, tokenizer ids)
  cache.py      those facts from a cache, or from a child process beside the export's writing
  structure.py  files, architecture, tensor names and shapes, dtype, config.json against the tensors
  tokens.py     tokenizer against the embedding, generation_config.json, EOS ids
  selfcheck.py  the export's self-check (SelfCheck, self_check)

Nothing here imports transformers at module level, reads tensor data, or imports `verify`: an export loads this
package and no more.
"""
