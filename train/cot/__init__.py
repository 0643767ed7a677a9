"""The five-step long chain-of-thought construction (`keye cot CONFIG`) and rejection-sampling fine-tuning.

  collect.py   step 1: prompts with reference answers from conversation manifests (+ rewriting, merging)
  traces.py    step 2: N traces per prompt from the jitted sampler, response- and step-level confidence
  assess.py    step 3: final answer by rule verifiers, steps by a judge -> grade A / B / C
  review.py    step 4: review queue export (B and borderline A) and re-import by id
  score.py     step 5: quality score 1-5, upsampling of 4-5, the SFT manifest with provenance
  report.py    pass rates, grades, histograms (PNG) and the JSON summary
  run.py       the resumable, host-sharded driver (mode "cot" or "rft")
"""
