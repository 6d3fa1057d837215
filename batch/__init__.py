"""Batch runs of saved ComfyUI workflows, workflow conversion and validation.

- convert.py     editor-format workflow -> API prompt (the frontend's graphToPrompt rules: subgraphs, legacy group
                 nodes, bypass/mute, PrimitiveNode, Reroute), PNG/JSON loading
- widgets.py     the widgets the editor gives each node (rules + extension table) and reading widgets_values
- text.py        dynamic prompts and %date:...% / %NODE.widget% replacement
- sweep.py       --set/--sweep/--runs parsing, product/zip expansion, stable run keys
- client.py      aiohttp client for /prompt, /history, /queue, /view, /object_info, /ws with retries
- runner.py      runs spread over one or more servers (per-server concurrency, failover, one give-up deadline),
                 per-server progress, downloads, manifest.jsonl, resume
- report.py      reward ranking of the outputs and the HTML gallery
- cli.py         ``rewardlab run`` (add_run_subcommand / run_main)
- stock_nodes.py table of the stock nodes our workflows use; validate.py checks shipped workflows
"""
