"""Evaluation: every benchmark has a `predict` step (batched generation to an answers JSONL) and a separate
`score` / `review` step that reads answer files, so answers from any system are scored the same way.

  scienceqa    ScienceQA multiple choice: build, predict, score (LLaVA's official verdicts or lenient ones,
               per-subject tables)
  scienceqa_ensemble  a text-only GPT's ScienceQA answers, and the complement / judge ensembles with ours
  llava_bench  LLaVA-Bench: predict, review (GPT judge vs reference answers), summarize (relative scores)
  compare      pairwise GPT judging of two answer files in both orders: win / tie / lose, win score
  vqa          VQA-style short-answer accuracy with the standard normalisation
  pope         POPE yes/no accuracy, precision, recall, F1, yes-ratio
  captioning   COCO-layout captioning (COCO, Flickr30k, NoCaps): CIDEr, BLEU, METEOR, ROUGE-L via pycocoevalcap
  vsr          VSR true/false statements: accuracy
  mme          MME yes/no pairs: acc, acc+, per-subtask scores, perception / cognition totals
  textvqa      TextVQA with LLaVA's m4c evaluator rules
  gqa          GQA exact match after LLaVA's normalisation
  mmbench      MMBench dev TSV with circular evaluation
  ehub         LVLM-eHub-style counting and multi-class identification (short answers)
  suite        every configured benchmark x every model -> one table (md / csv / json) + bar chart
  benchmarks   the benchmark kinds the suite runs (questions, scorer, table metrics)
  normalize    the official VQA / EvalAI answer processing (kept with its quirks)
  runner       the predict / score sub-commands the breadth benchmarks share
  predict      the shared batched generation (also a CLI for generic questions files)
  judge        the judge prompt, score-line parser and client calls
  answers      reading questions / answers files
"""
