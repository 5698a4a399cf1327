"""The planner (python -m launch.plan): Hoffmann et al.'s compute-optimal numbers, the presets
and their sizes, the memory plan (compiled through a stand-in for launch.compile, or counted),
the cost, the loss-versus-compute fit on synthetic runs, and one-line errors for bad input.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image
from scipy import optimize

from configs import lm as lm_configs
from data import tokenizers
from launch import chips as chips_lib
from launch import memory_estimate, plan, run_metrics, scaling
from model import transformer
from train import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

# Hoffmann et al. 2022, Table 3 (approach 1): parameters, FLOPs, tokens.
TABLE_3 = [
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]


def run_main(capsys, *args):
  """main() in this process: (exit status, stdout, stderr)."""
  code = 0
  try:
    plan.main(['launch.plan', *args])
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


# --- laws --------------------------------------------------------------------


def test_approach1_reproduces_table_3():
  """One row (1 B) anchors the law; the other eight test its exponent 0.50. Tolerances: 4% on
  parameters for a budget, 7% on the budget for a size (twice: C grows as N^2), 8% on tokens
  (the table rounds 67 B's 1.43 T tokens to 1.5 T)."""
  law = scaling.approach1()
  for n, c, d in TABLE_3:
    n_opt, d_opt = law.optimal(c)
    assert n_opt == pytest.approx(n, rel=0.04), (n, n_opt)
    assert d_opt == pytest.approx(d, rel=0.08), (n, d_opt)
    assert law.flops_for_params(n) == pytest.approx(c, rel=0.07)
    assert 6 * n_opt * d_opt == pytest.approx(c)


@pytest.mark.parametrize('law', [scaling.CHINCHILLA, scaling.EPOCH])
def test_parametric_optimum_minimises_the_loss(law):
  """The closed form against a numeric minimisation of L(N, C / 6N) over N."""
  for c in (1e19, 5.76e23, 1e26):
    res = optimize.minimize_scalar(
        lambda log_n, c=c: law.loss(math.exp(log_n), c / 6 / math.exp(log_n)),
        bounds=(math.log(1e6), math.log(1e15)), method='bounded', options={'xatol': 1e-10})
    n_opt, d_opt = law.optimal(c)
    assert n_opt == pytest.approx(math.exp(res.x), rel=1e-4)
    assert law.flops_for_params(n_opt) == pytest.approx(c, rel=1e-9)
  # Hoffmann et al.'s loss at Chinchilla (70 B, 1.4 T), by hand from their constants.
  assert scaling.CHINCHILLA.loss(70e9, 1.4e12) == pytest.approx(
      1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28)


def test_epoch_refit_agrees_with_approaches_1_and_2():
  """Besiroglu et al.'s refit puts Gopher's budget near Chinchilla's 70 B / ~20 tokens each."""
  n, d = scaling.EPOCH.optimal(5.76e23)
  assert n == pytest.approx(67e9, rel=0.15)
  assert 15 < d / n < 25


# --- presets, memory, time, cost ---------------------------------------------


@pytest.fixture(scope='module')
def presets():
  return {p.name: p for p in plan.load_presets()}


def test_presets_and_their_sizes(presets):
  assert {'tiny', 'nanogpt_cpu', 'gpt2_124m', 'llama_1b', 'llama_7b'} <= set(presets)
  # Llama-3.2-1B's published size (tied embeddings) and Llama-2-7B's.
  assert presets['llama_1b'].params == 1_235_814_400
  assert presets['llama_7b'].params == 6_738_415_616
  names = [p.name for p in plan.nearest(list(presets.values()), 1.5e9)]
  assert names[:2] == ['llama_1b', 'llama_7b']


def test_moe_presets_list_active_and_total(monkeypatch, capsys):
  """Where count_params takes `active` (the MoE transformer), presets carry both counts and
  the report shows them; a stand-in count that halves the active parameters checks it."""
  dense = transformer.count_params

  def count_params(cfg, active=False):
    return dense(cfg) // 2 if active else dense(cfg)

  monkeypatch.setattr(transformer, 'count_params', count_params)
  llama_1b = next(p for p in plan.load_presets() if p.name == 'llama_1b')
  assert (llama_1b.params, llama_1b.active_params) == (1_235_814_400, 617_907_200)
  code, out, _ = run_main(capsys, '--params=6e8', '--law=approach1')
  assert code == 0 and '618 M active of 1.24 B' in out


def test_memory_estimate_counts_state_and_picks_the_smallest_fsdp(presets):
  cfg = presets['llama_7b'].model
  n = 6_738_415_616
  est = memory_estimate.estimate(cfg, batch_size=8, seq_len=4096, mesh={'data': 2, 'fsdp': 4})
  # fp32 params and grads, two fp32 Adam moments: 16 bytes a parameter, over fsdp=4.
  assert est.params + est.grads + est.optimizer == 16 * n / 4
  # float32 logits and their gradient: 1 sequence of 4096 tokens per device, vocab 32000.
  assert est.logits == 2 * 4096 * 32000 * 4
  full = memory_estimate.estimate(
      transformer.TransformerConfig(**{**vars(cfg), 'remat': 'full'}), 8, 4096,
      {'data': 2, 'fsdp': 4})
  assert full.activations < est.activations
  hbm = chips_lib.get_chip('v5p').hbm_bytes
  layout = memory_estimate.propose_layout(cfg, 256, 4096, 256, hbm)
  mesh = layout.mesh
  assert mesh['data'] * mesh['fsdp'] == 256 and layout.grad_accum == 1
  assert layout.memory.total <= 0.85 * hbm
  smaller = {'data': 256 // (mesh['fsdp'] // 2), 'fsdp': mesh['fsdp'] // 2}
  assert memory_estimate.estimate(cfg, 256, 4096, smaller).total > 0.85 * hbm
  # 8 H100s, 32 sequences each: fsdp over all 8, then microbatches until it fits.
  h100 = chips_lib.get_chip('h100').hbm_bytes
  layout = memory_estimate.propose_layout(cfg, 256, 4096, 8, h100)
  assert layout.mesh['fsdp'] == 8 and layout.grad_accum > 1
  assert layout.memory.total <= 0.85 * h100
  fewer = memory_estimate.estimate(cfg, 256, 4096, layout.mesh, layout.grad_accum // 2)
  assert fewer.total > 0.85 * h100
  assert layout.memory.activations == pytest.approx(
      memory_estimate.estimate(cfg, 256, 4096, layout.mesh).activations / layout.grad_accum)


def fake_compiler(per_device, flops, bytes_accessed, fits=True, notes=()):
  calls = []

  def memory_plan(config, topology):
    calls.append((config, topology))
    mesh = {k: config.mesh[k] for k in ('data', 'fsdp', 'tensor')}
    return types.SimpleNamespace(
        per_device_bytes=per_device, argument_bytes=per_device / 2, output_bytes=per_device / 4,
        temp_bytes=per_device / 4, code_bytes=1e6, hbm_bytes=95 * 2**30, fits=fits,
        flops=flops, bytes_accessed=bytes_accessed, chip='v5p', n_devices=256, mesh=mesh,
        compile_seconds=1.0, largest_arrays=[], notes=list(notes))

  return types.SimpleNamespace(memory_plan=memory_plan), calls


def test_compiled_plan_and_roofline(capsys, monkeypatch):
  """With launch.compile present the plan reads its memory and, without an MFU, times the step
  by the compiled program's FLOPs and bytes at the chip's peak rates."""
  compiler, calls = fake_compiler(40 * 2**30, flops=2e14, bytes_accessed=1e12)
  monkeypatch.setattr(plan, 'load_compiler', lambda: (compiler, ''))
  code, out, _ = run_main(capsys, '--params=7e9', '--chip=v5p', '--chips=256',
                          '--preset=llama_7b', '--json')
  assert code == 0
  result = json.loads(out)
  config, topology = calls[0]
  assert topology == 'v5p-512'  # v5p names count TensorCores, two a chip
  assert config.batch_size == 256 and config.mesh.data * config.mesh.fsdp == 256
  assert config.grad_accum == result['run']['grad_accum']
  run = result['run']
  assert run['memory']['per_device_bytes'] == 40 * 2**30
  assert run['memory']['source'].startswith('compiled for v5p-512')
  v5p = chips_lib.get_chip('v5p')
  step = max(2e14 / v5p.bf16_flops, 1e12 / v5p.hbm_bandwidth)
  assert run['step_time']['seconds'] == pytest.approx(step)
  assert 'roofline' in run['step_time']['source']
  llama_7b = next(p for p in plan.load_presets() if p.name == 'llama_7b')
  tokens = result['budget']['flops'] / transformer.train_flops_per_token(llama_7b.model, 4096)
  assert run['steps'] == math.ceil(tokens / (256 * 4096))
  assert run['hours'] == pytest.approx(run['steps'] * step / 3600)
  assert run['cost']['on_demand'] == pytest.approx(4.20 * 256 * run['hours'])


def test_compiled_plan_that_does_not_fit(capsys, monkeypatch):
  """libtpu stops at its memory check without a cost analysis: the compiled memory is
  reported, and the roofline falls back to the analytic count."""
  note = 'libtpu stopped at its memory check'
  compiler, _ = fake_compiler(300 * 2**30, flops=0.0, bytes_accessed=0.0, fits=False,
                              notes=[note])
  monkeypatch.setattr(plan, 'load_compiler', lambda: (compiler, ''))
  code, out, _ = run_main(capsys, '--params=7e9', '--chip=v5p', '--chips=256',
                          '--preset=llama_7b')
  assert code == 0
  assert 'Memory per device: 300.0 GiB of 95.0 GiB HBM, DOES NOT FIT' in out
  assert note in out and 'compiled for v5p-512' in out
  assert 'no cost analysis; roofline of the analytic count' in out


def test_chips_hours_budget_with_mfu_and_prices(capsys, tmp_path):
  prices = tmp_path / 'prices.json'
  prices.write_text(json.dumps({'date': 'test', 'chips': {'v5e': {'on_demand': 2.0,
                                                                   'spot': 0.5}}}))
  code, out, _ = run_main(capsys, '--chip=v5e', '--chips=64', '--hours=10', '--mfu=0.5',
                          f'--prices={prices}', '--nocompile', '--json')
  assert code == 0
  result = json.loads(out)
  assert result['budget']['flops'] == pytest.approx(64 * 197e12 * 0.5 * 10 * 3600)
  run = result['run']
  assert run['memory']['source'].startswith('estimate')
  # The whole budget's tokens at the stated MFU take the budget's hours (up to a partial step).
  assert run['hours'] == pytest.approx(10, rel=1e-3)
  assert run['cost']['on_demand'] == pytest.approx(2.0 * 64 * run['hours'])
  assert run['cost']['spot'] == pytest.approx(0.5 * 64 * run['hours'])
  n_opt, d_opt = scaling.CHINCHILLA.optimal(result['budget']['flops'])
  assert result['optimal']['params'] == pytest.approx(n_opt)
  code, out, _ = run_main(capsys, '--chip=v5e', '--chips=64', '--hours=10', '--mfu=0.5',
                          f'--prices={prices}', '--nocompile')
  assert 'Memory per device' in out and 'estimate' in out and '$' in out


# --- fit on synthetic runs ---------------------------------------------------

E_TRUE, A_TRUE, ALPHA_TRUE = 1.7, 400.0, 0.13


def write_run(workdir, steps, loss=None, mfu=None):
  """A run directory as the trainer leaves it: config.json, the byte tokenizer, events."""
  config = lm_configs.get_config('tiny')
  config.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2)
  config.data.tokenizer.kind = 'byte'
  config.data.seq_len = 64
  config.batch_size = 4
  config.steps = steps
  os.makedirs(workdir, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  tokenizers.load_or_train_tokenizer(config.data.tokenizer, lambda: [], str(workdir))
  writer = metrics.SummaryWriter(str(workdir))
  for step, value in enumerate(mfu or [], start=1):
    writer.scalars(step * 10, {'train/mfu': value})
  writer.scalars(steps, {'train/loss': 9.0})
  if loss is not None:
    writer.scalars(steps // 2, {'eval/loss': loss + 1.0})
    writer.scalars(steps, {'eval/loss': loss})
  writer.close()
  return config


@pytest.fixture(scope='module')
def flops_per_step():
  """By the trainer's formula: batch x seq_len x train_flops_per_token of the model."""
  cfg = lm_configs.get_config('tiny')
  cfg.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2)
  model = transformer.TransformerConfig.from_config(cfg.model, 257)
  return 4 * 64 * transformer.train_flops_per_token(model, 64)


def test_fit_recovers_a_known_law(tmp_path, capsys, flops_per_step):
  """Six runs over five decades of compute, losses from a known law with 0.1% noise. The
  tolerances hold for 30 noise seeds (worst: alpha 0.002, E 0.15, prediction 0.5%)."""
  rng = np.random.default_rng(0)
  steps = np.geomspace(100, 10_000_000, 6).astype(int)
  dirs = []
  for s in steps:
    loss = (E_TRUE + A_TRUE * (s * flops_per_step) ** -ALPHA_TRUE) * (1 + 0.001 * rng.normal())
    write_run(tmp_path / f'run{s}', int(s), loss)
    dirs.append(str(tmp_path / f'run{s}'))
  point = run_metrics.read_run(dirs[0])
  assert point.step == steps[0] and point.flops == pytest.approx(steps[0] * flops_per_step)
  png = tmp_path / 'out' / 'fit.png'
  predict = 10 * steps[-1] * flops_per_step
  code, out, err = run_main(capsys, 'fit', f'--workdirs={",".join(dirs)}', f'--plot={png}',
                            f'--predict_flops={predict}', '--json')
  assert code == 0, err
  result = json.loads(out)
  fit = result['fit']
  assert fit['alpha'] == pytest.approx(ALPHA_TRUE, abs=0.01)
  assert fit['E'] == pytest.approx(E_TRUE, abs=0.2)
  truth = E_TRUE + A_TRUE * predict**-ALPHA_TRUE
  assert result['prediction']['loss'] == pytest.approx(truth, rel=0.015)
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with Image.open(png) as image:
    image.verify()
    assert image.size[0] > 300 and image.size[1] > 200


def test_read_run_matches_the_task_count(tmp_path, flops_per_step):
  """read_run's FLOPs come through the LM task; the fixture's by the formula by hand."""
  write_run(tmp_path / 'r', 50, loss=3.0)
  assert run_metrics.flops_per_step(str(tmp_path / 'r')) == pytest.approx(flops_per_step)


def test_mfu_from_a_run(tmp_path, capsys):
  write_run(tmp_path / 'm', 100, loss=3.0, mfu=[0.05, 0.41, 0.39, 0.40])  # first: compiling
  code, out, _ = run_main(capsys, '--chip=v6e', '--chips=8', '--hours=2',
                          f'--mfu_from={tmp_path / "m"}', '--nocompile', '--json')
  assert code == 0
  flops = json.loads(out)['budget']['flops']
  assert flops == pytest.approx(8 * 918e12 * 0.40 * 2 * 3600, rel=1e-6)


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize('args, words', [
    (['--flops=-1e21'], '--flops=-1e+21 must be a positive number'),
    (['--chip=v9', '--chips=4', '--hours=1', '--mfu=0.4'], "Unknown chip 'v9'"),
    (['--chip=v5p', '--chips=4', '--hours=-2', '--mfu=0.4'], '--hours=-2 must be'),
    (['--chip=v5p', '--chips=4', '--hours=2'], 'needs an MFU'),
    (['--flops=1e21', '--params=1e9'], 'Give one budget'),
    (['--flops=1e21', '--mfu=40'], '--mfu=40 must be in (0, 1]'),
    (['--flops=1e21', '--law=kaplan'], "Unknown law 'kaplan'"),
    (['--flops=1e21', '--preset=gpt5'], "--preset='gpt5' is not in configs/lm.py"),
    (['fit', '--workdirs=a,b'], 'at least 3 runs'),
])
def test_bad_input_is_one_line(capsys, args, words):
  code, out, err = run_main(capsys, *args)
  assert code == 2 and not out
  assert err.count('\n') == 1 and err.startswith('Config error: ') and words in err, err


def test_workdir_without_eval_loss(tmp_path, capsys):
  for i in range(3):
    write_run(tmp_path / f'w{i}', 100 * (i + 1), loss=None if i == 1 else 3.0)
  dirs = ','.join(str(tmp_path / f'w{i}') for i in range(3))
  code, _, err = run_main(capsys, 'fit', f'--workdirs={dirs}', f'--plot={tmp_path / "p.png"}')
  assert code == 2 and err.count('\n') == 1
  assert err.startswith('Data error: ') and f'{tmp_path / "w1"} has no eval/loss' in err
  code, _, err = run_main(capsys, '--chip=v5p', '--chips=4', '--hours=1',
                          f'--mfu_from={tmp_path / "w0"}')
  assert code == 2 and 'no train/mfu' in err and err.count('\n') == 1


def test_the_command_line_fails_in_one_line(tmp_path):
  """The real `python -m launch.plan` process: exit status 2, one line, no traceback."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '1'}
  proc = subprocess.run([sys.executable, '-m', 'launch.plan', '--chip=tpu9', '--chips=4',
                         '--hours=1', '--mfu=0.4'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith('WARNING')]
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert lines == ["Config error: --chip: Unknown chip 'tpu9'; known chips: v4, v5e, v5p, v6e, "
                   'a100, h100, h200.'], proc.stderr[-2000:]
