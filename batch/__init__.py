"""Batch runs of saved ComfyUI workflows, workflow conversion and validation.

- convert.py     editor-format workflow -> API prompt (the frontend's graphToPrompt rules), PNG/JSON loading
- sweep.py       --set/--sweep/--runs parsing, product/zip expansion, stable run keys
- client.py      aiohttp client for /prompt, /history, /queue, /view, /object_info, /ws with retries
- runner.py      bounded-concurrency runner, progress, downloads, manifest.jsonl, resume
- report.py      reward ranking of the outputs and the HTML gallery
- cli.py         ``rewardlab run`` (add_run_subcommand / run_main)
- stock_nodes.py table of the stock nodes our workflows use; validate.py checks shipped workflows
"""
