"""The tools around the library: the ``selfattn`` command (explain | bench | plan), the demo, the benchmark
measurements and their plot. Nothing in the core imports this package; it imports the core like any user.

    cli.py       main(), the parser, and SUBCOMMANDS: where every subcommand is registered
    common.py    what every subcommand shares: UserError (one line, exit 2), output files, model directories
    explain.py   ``selfattn explain``: text, WAV (Whisper), image (ViT), other families through transformers
    bench.py     ``selfattn bench``: progress, table and plot around measure.py
    plan.py      ``selfattn plan``: the library's Plan and cost estimates, printed
    measure.py   timing and peak-memory measurement of attention paths (also used by benchmarks/)
    plots.py     bench_png: throughput and memory against sequence length
    demo.py      ``python -m selfattn.app.demo``: the README's first command
"""
