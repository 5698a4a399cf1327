"""The evaluation harness against lm-evaluation-harness's own Hugging Face backend, on CPU
(docs/benchmarks.md, Evaluation).

  python docs/baselines/evals_bench.py --workdir=/tmp/kiln_tiny            # both sides
  python docs/baselines/evals_bench.py --workdir=/tmp/kiln_tiny --side=kiln

From the project root, on a trained LM run (README's first command). The run is exported
with `python -m train.convert export` (to WORKDIR_hf, once), so both sides score the same
weights. Three lm-eval YAML tasks are written from stdlib text (json/ and email/):
- mc: 100 documents, 4 choices each (400 log-likelihood requests): a line's first half,
  its own second half against three other lines' second halves;
- ppl: 40 texts of 400 characters (loglikelihood_rolling; two windows each at 128 tokens);
- gen: 100 line halves continued greedily, until a newline, at most 32 tokens.
Kiln: `evals.runner.evaluate` on `KilnLM.from_run` (batch 32), each task run twice (the
first compiles). lm-eval: `HFLM` (torch, batch 32, max_length 128, no BOS) through
`lm_eval.evaluator.evaluate`. Each side runs in its own process (set OMP_WAIT_POLICY=PASSIVE
on a shared machine). Prints requests per second and each side's scores.
"""

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import sysconfig
import tempfile
import time

TASKS = {'mc': 400, 'ppl': 40, 'gen': 100}  # name -> requests
YAML = {
    'mc': 'output_type: multiple_choice\ndoc_to_text: ctx\ndoc_to_choice: choices\n'
          'doc_to_target: answer\ntarget_delimiter: ""\n'
          'metric_list: [{metric: acc}, {metric: acc_norm}]\n',
    'ppl': 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: text\n'
           'metric_list: [{metric: bits_per_byte}]\n',
    'gen': 'output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n'
           'target_delimiter: ""\ngeneration_kwargs: {until: ["\\n"], max_gen_toks: 32}\n'
           'metric_list: [{metric: exact_match}, {metric: chrf}]\n',
}


def write_tasks(out: pathlib.Path) -> None:
  rnd = random.Random(0)
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  files = sorted(stdlib.glob('json/*.py')) + sorted(stdlib.glob('email/*.py'))
  lines = [ln for f in files for ln in f.read_text().splitlines()
           if 30 <= len(ln.strip()) <= 70 and not ln.strip().startswith('#')]
  rnd.shuffle(lines)
  docs = {'mc': [], 'gen': [], 'ppl': []}
  for line in lines[:100]:
    others = rnd.sample([x for x in lines if x != line], 3)
    choices = [line[len(line) // 2:]] + [o[len(o) // 2:] for o in others]
    rnd.shuffle(choices)
    docs['mc'].append({'ctx': line[:len(line) // 2], 'choices': choices,
                       'answer': choices.index(line[len(line) // 2:])})
  docs['gen'] = [{'prompt': ln[:len(ln) // 2], 'target': ln[len(ln) // 2:]}
                 for ln in lines[100:200]]
  text = ''.join(f.read_text() for f in files[:6])
  docs['ppl'] = [{'text': text[i:i + 400]} for i in range(0, 40 * 400, 400)]
  for name, rows in docs.items():
    (out / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (out / f'bench_{name}.yaml').write_text(
        f'task: bench_{name}\ndataset_path: json\n'
        f'dataset_kwargs: {{data_files: {{test: {name}.jsonl}}}}\ntest_split: test\n'
        + YAML[name])


def run_kiln(workdir: str, tasks: pathlib.Path) -> dict:
  from evals import backend, runner
  lm = backend.KilnLM.from_run(workdir, batch_size=32)
  out = {}
  for rep in ('cold', 'warm'):
    for name, n in TASKS.items():
      start = time.perf_counter()
      res = runner.evaluate(lm, [str(tasks / f'bench_{name}.yaml')], bootstrap_iters=0)
      seconds = time.perf_counter() - start
      out[f'{name}/{rep}'] = {'req_per_s': round(n / seconds, 1), 's': round(seconds, 2),
                              'scores': res['results'][f'bench_{name}']}
  return out


def run_hf(hf_dir: str, tasks: pathlib.Path) -> dict:
  os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
  os.chdir(tasks)  # lm-eval reads relative data_files from the working directory
  from lm_eval.evaluator import evaluate
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager
  lm = HFLM(pretrained=hf_dir, device='cpu', batch_size=32, max_length=128,
            add_bos_token=False, dtype='float32')
  manager = TaskManager(include_path=str(tasks), include_defaults=False)
  out = {}
  for name, n in TASKS.items():
    loaded = manager.load([f'bench_{name}'])
    start = time.perf_counter()
    res = evaluate(lm=lm, task_dict=loaded, bootstrap_iters=0)
    seconds = time.perf_counter() - start
    out[name] = {'req_per_s': round(n / seconds, 1), 's': round(seconds, 2),
                 'scores': {k: v for k, v in res['results'][f'bench_{name}'].items()
                            if ',' in k}}
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--side', choices=('both', 'kiln', 'hf'), default='both')
  parser.add_argument('--tasks_dir', default=None)
  args = parser.parse_args()
  hf_dir = args.workdir.rstrip('/') + '_hf'
  if args.tasks_dir is None:
    tasks = pathlib.Path(tempfile.mkdtemp(prefix='kiln-evals-bench-'))
    write_tasks(tasks)
  else:
    tasks = pathlib.Path(args.tasks_dir)
  if args.side == 'both':
    if not os.path.exists(hf_dir):
      subprocess.run([sys.executable, '-m', 'train.convert', 'export',
                      f'--workdir={args.workdir}', f'--hf_dir={hf_dir}'], check=True)
    for side in ('kiln', 'hf'):
      subprocess.run([sys.executable, __file__, f'--workdir={args.workdir}', f'--side={side}',
                      f'--tasks_dir={tasks}'], check=True)
    return
  result = run_kiln(args.workdir, tasks) if args.side == 'kiln' else run_hf(hf_dir, tasks)
  print(args.side, json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
