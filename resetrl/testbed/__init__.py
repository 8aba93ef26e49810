"""The chain-arithmetic testbed for comparing resets with GRPO (docs/benchmarks.md, section 6;
bench/synthetic_testbed.py): a task whose every step is checkable (chain_task), a tiny tokenizer (tokenizer), a
small Llama trained from scratch to partial competence (sft), all built once per content hash (build), and the
across-seed statistics of a comparison (compare).

Nothing is imported here, so the step-checker registry can import chain_task without pulling in torch.
"""
