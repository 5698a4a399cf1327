"""The compute and cost planner: how large a model, how many tokens, will it fit, how long, what
cost; and a scaling law fitted to your own runs.

  python -m launch.plan --chip=v5p --chips=256 --hours=24 --mfu=0.4
  python -m launch.plan --flops=1e21 [--chip=v5e --chips=64]
  python -m launch.plan --params=7e9 --chip=v5p --chips=128 --mfu_from=WORKDIR
  python -m launch.plan fit --workdirs=DIR1,DIR2,DIR3 --predict_flops=1e20 --plot=fit.png

A budget is chips x hours (with an MFU, stated or measured, to turn hours into FLOPs),
FLOPs, or a target size. The recommendation comes from a compute-optimal law
(launch/scaling.py); the Kiln presets of configs/lm.py nearest that size are listed; the
one chosen (`--preset`, else the nearest) gets a mesh, a memory plan per device (an
ahead-of-time TPU compile through `launch.compile` when it and libtpu are installed, else
launch/memory_estimate.py's count, labelled an estimate), a step time (from the MFU, or the
roofline of the compiled program or of the count), the total time and the cost from a
price table (launch/prices.json, or --prices=FILE). `--json` prints it all for machines.
"""

import ast
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags

from configs import lm as lm_configs
from data import cli
from data.errors import ConfigError, DataError, exit_on_user_error
from launch import chips as chips_lib
from launch import memory_estimate, run_metrics, scaling
from model import transformer

DEFAULT_PRICES = os.path.join(os.path.dirname(__file__), 'prices.json')
NEAREST = 3  # presets listed

FLAGS = flags.FlagValues()  # this command's own, so that tests can run main() in process
flags.DEFINE_string('chip', '', f'Accelerator: {", ".join(chips_lib.CHIPS)}.', flag_values=FLAGS)
flags.DEFINE_integer('chips', 0, 'Number of chips (GPUs for GPU kinds).', flag_values=FLAGS)
flags.DEFINE_float('hours', 0.0, 'Wall-clock hours on --chips (a chips x hours budget).',
                   flag_values=FLAGS)
flags.DEFINE_float('flops', 0.0, 'A budget in training FLOPs.', flag_values=FLAGS)
flags.DEFINE_float('params', 0.0, 'A target model size (parameters): plan its compute-optimal '
                   'tokens.', flag_values=FLAGS)
flags.DEFINE_float('mfu', 0.0, 'Model FLOPs utilization to plan with, in (0, 1].',
                   flag_values=FLAGS)
flags.DEFINE_string('mfu_from', '', 'A Kiln run directory whose logged train/mfu to plan with.',
                    flag_values=FLAGS)
flags.DEFINE_string('law', 'chinchilla', f'Compute-optimal law: {", ".join(scaling.LAW_NAMES)}.',
                    flag_values=FLAGS)
flags.DEFINE_float('exponent', 0.0, 'approach1: a in N_opt ~ C^a (default 0.50; 0.49 is '
                   'approach 2).', flag_values=FLAGS)
flags.DEFINE_string('preset', '', 'The configs/lm.py preset to plan memory and time for '
                    '(default: the nearest in size).', flag_values=FLAGS)
flags.DEFINE_string('prices', DEFAULT_PRICES, 'Price table (JSON, see launch/prices.json).',
                    flag_values=FLAGS)
flags.DEFINE_bool('compile', True, 'Plan memory with an ahead-of-time TPU compile when '
                  'launch.compile and libtpu are installed.', flag_values=FLAGS)
flags.DEFINE_bool('json', False, 'Print the plan as JSON.', flag_values=FLAGS)
flags.DEFINE_list('workdirs', [], 'fit: Kiln run directories (one recipe, several sizes).',
                  flag_values=FLAGS)
flags.DEFINE_float('predict_flops', 0.0, 'fit: predict the loss at this compute (default: 10x '
                   'the largest run).', flag_values=FLAGS)
flags.DEFINE_string('plot', 'scaling_fit.png', 'fit: where to write the PNG.', flag_values=FLAGS)


# ---------------------------------------------------------------------------
# Budget.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budget:
  flops: float
  source: str  # how the FLOPs were found
  chip: chips_lib.Chip | None
  chips: int
  mfu: float  # 0: none stated or measured
  mfu_source: str


def _positive(name: str, value: float) -> None:
  if not (value > 0 and math.isfinite(value)):
    raise ConfigError(f'--{name}={value:g} must be a positive number.')


def resolve_budget(f, law) -> Budget:
  """The FLOP budget from exactly one of chips x hours, --flops, --params; the chip and MFU."""
  given = [name for name, on in (('chips x hours', f.hours != 0), ('--flops', f.flops != 0),
                                 ('--params', f.params != 0)) if on]
  if len(given) != 1:
    raise ConfigError('Give one budget: --chip=v5p --chips=256 --hours=24 --mfu=0.4 (chips x '
                      'hours), --flops=1e21, or --params=7e9 (a target size); got '
                      f'{" and ".join(given) or "none"}.')
  chip = None
  if f.chip:
    try:
      chip = chips_lib.get_chip(f.chip)
    except ValueError as e:
      raise ConfigError(f'--chip: {e}') from None
  if f.chips:
    _positive('chips', f.chips)
  if (chip is None) != (not f.chips):
    raise ConfigError('Give --chip and --chips together (e.g. --chip=v5p --chips=256).')
  if f.mfu and f.mfu_from:
    raise ConfigError('Give --mfu or --mfu_from, not both.')
  mfu, mfu_source = 0.0, ''
  if f.mfu:
    if not 0 < f.mfu <= 1:
      raise ConfigError(f'--mfu={f.mfu:g} must be in (0, 1] (e.g. 0.4 for 40%).')
    mfu, mfu_source = f.mfu, 'stated (--mfu)'
  elif f.mfu_from:
    mfu, mfu_source = run_metrics.measured_mfu(f.mfu_from), f'measured in {f.mfu_from}'
  if f.hours:
    _positive('hours', f.hours)
    if chip is None:
      raise ConfigError('A chips x hours budget needs --chip and --chips as well as --hours.')
    if not mfu:
      raise ConfigError('A chips x hours budget needs an MFU to turn hours into FLOPs: '
                        '--mfu=0.4 (stated) or --mfu_from=WORKDIR (measured in a Kiln run).')
    flops = f.chips * chip.bf16_flops * mfu * f.hours * 3600
    source = f'{f.chips} x {chip.name} x {f.hours:g} h at MFU {mfu:.3g}'
  elif f.flops:
    _positive('flops', f.flops)
    flops, source = f.flops, '--flops'
  else:
    _positive('params', f.params)
    flops = law.flops_for_params(f.params)
    source = f'the compute-optimal budget of {f.params:.3g} parameters ({law.name})'
  return Budget(flops, source, chip, f.chips, mfu, mfu_source)


# ---------------------------------------------------------------------------
# Presets.
# ---------------------------------------------------------------------------


def preset_names() -> list[str]:
  """The presets configs/lm.py's get_config accepts, read from its `preset == '...'` tests
  (the file keeps no list, and new presets then need no second edit)."""
  tree = ast.parse(inspect.getsource(lm_configs.get_config))
  names = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
        and node.left.id == 'preset'):
      names += [c.value for c in node.comparators
                if isinstance(c, ast.Constant) and isinstance(c.value, str)]
  return list(dict.fromkeys(names))


def tokenizer_vocab(config: ml_collections.ConfigDict) -> int:
  """The vocabulary a preset's tokenizer would have, without training it: SentencePiece's
  configured size, bytes' 257; a char vocabulary depends on the text (128 assumed)."""
  tok = config.data.tokenizer
  return {'sentencepiece': int(tok.vocab_size), 'byte': 257}.get(tok.kind, 128)


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  config: ml_collections.ConfigDict
  model: transformer.TransformerConfig
  params: int  # all parameters
  active_params: int  # taking part in one token's forward pass (all of them unless MoE)
  flops_per_token: float  # the trainer's count (6 N_matmul + attention), the one MFU uses


def _active_params(model: transformer.TransformerConfig) -> int:
  """Parameters one token uses: count_params(active=True) where the MoE transformer offers
  it (branch moe), else all of them (a dense model)."""
  if 'active' in inspect.signature(transformer.count_params).parameters:
    return transformer.count_params(model, active=True)
  return transformer.count_params(model)


def load_presets() -> list[Preset]:
  out = []
  for name in preset_names():
    config = lm_configs.get_config(name)
    model = transformer.TransformerConfig.from_config(config.model, tokenizer_vocab(config))
    total = transformer.count_params(model)
    active = _active_params(model)
    fpt = transformer.train_flops_per_token(model, config.data.seq_len)
    out.append(Preset(name, config, model, total, active, fpt))
  return out


def nearest(presets: Sequence[Preset], params: float, k: int = NEAREST) -> list[Preset]:
  """The k presets nearest `params` in log size (active parameters: what compute scales with)."""
  return sorted(presets, key=lambda p: abs(math.log(p.active_params / params)))[:k]


# ---------------------------------------------------------------------------
# Memory, step time and cost of one preset on the budget's chips.
# ---------------------------------------------------------------------------


def load_compiler():
  """(launch.compile, '') when it and libtpu are importable, else (None, the reason)."""
  if importlib.util.find_spec('launch.compile') is None:
    return None, 'launch.compile is not installed'
  if importlib.util.find_spec('libtpu') is None:
    return None, 'libtpu is not installed (pip install "kiln[aot]")'
  from launch import compile as compile_lib
  return compile_lib, ''


def topology_name(chip: chips_lib.Chip, n_chips: int) -> str:
  """Cloud TPU's name for `n_chips` chips of `chip` (v4 and v5p names count TensorCores)."""
  return f'{chip.name}-{n_chips * chip.cores_per_chip}'


def _fit_batch(batch_size: int, n_devices: int) -> int:
  """The preset's batch, rounded up to a multiple of the devices (each holds whole sequences)."""
  return -(-batch_size // n_devices) * n_devices


def compiled_memory(preset: Preset, batch: int, layout: memory_estimate.Layout,
                    chip: chips_lib.Chip) -> tuple[dict | None, float, str]:
  """(memory, roofline step seconds, how) from an ahead-of-time compile of the preset's train
  step for the TPU topology; (None, 0, why not) where launch.compile or libtpu is missing."""
  if not chip.cores_per_chip:
    return None, 0.0, f'{chip.name} is a GPU (ahead-of-time plans are for TPU topologies)'
  compiler, why_not = load_compiler()
  if compiler is None:
    return None, 0.0, why_not
  mesh = layout.mesh
  n = mesh['data'] * mesh['fsdp'] * mesh['tensor']
  config = ml_collections.ConfigDict(preset.config.to_dict())
  config.batch_size = batch
  config.grad_accum = layout.grad_accum
  config.mesh.update(mesh)
  topology = topology_name(chip, n)
  try:
    plan = compiler.memory_plan(config, topology)
  except (ConfigError, DataError) as e:
    return None, 0.0, f'the compile for {topology} failed: {e}'
  memory = {'source': f'compiled for {topology}', 'per_device_bytes': plan.per_device_bytes,
            'argument_bytes': plan.argument_bytes, 'temp_bytes': plan.temp_bytes,
            'output_bytes': plan.output_bytes, 'code_bytes': plan.code_bytes,
            'fits': bool(plan.fits), 'mesh': dict(plan.mesh),
            'notes': list(getattr(plan, 'notes', []))}
  if not plan.flops:  # libtpu gives no cost analysis for a program that does not fit
    return memory, 0.0, 'the compiled program has no cost analysis'
  roofline = memory_estimate.roofline_seconds(plan.flops, plan.bytes_accessed,
                                              chip.bf16_flops, chip.hbm_bandwidth)
  return memory, roofline, 'roofline of the compiled program (its FLOPs and bytes at peak rates)'


def estimated_memory(preset: Preset, est: memory_estimate.MemoryEstimate, chip: chips_lib.Chip,
                     flops_per_device: float, why_not: str) -> tuple[dict, float, str]:
  """(memory, roofline step seconds, how) from the analytic count."""
  memory = {'source': f'estimate (analytic count; {why_not})', 'per_device_bytes': est.total,
            'parts': dataclasses.asdict(est),
            'fits': est.total <= memory_estimate.HBM_HEADROOM * chip.hbm_bytes}
  recompute = 4 / 3 if preset.model.remat == 'full' else 1.0  # the forward pass again
  traffic = 2 * (est.params + est.grads + est.optimizer + est.activations)  # written, read
  roofline = memory_estimate.roofline_seconds(flops_per_device * recompute, traffic,
                                              chip.bf16_flops, chip.hbm_bandwidth)
  return memory, roofline, ('roofline of the analytic count (model FLOPs with remat '
                            'recompute, state and activation traffic, at peak rates; give '
                            '--mfu for a realistic time)')


def plan_preset(preset: Preset, budget: Budget, use_compile: bool) -> dict:
  """Mesh, memory per device, step time, steps and hours of `preset` on the budget's chips."""
  chip, n = budget.chip, budget.chips
  seq_len = int(preset.config.data.seq_len)
  batch = _fit_batch(int(preset.config.batch_size), n)
  layout = memory_estimate.propose_layout(preset.model, batch, seq_len, n, chip.hbm_bytes)
  tokens_per_step = batch * seq_len
  model_flops_per_step = preset.flops_per_token * tokens_per_step
  out = {'preset': preset.name, 'batch_size': batch, 'seq_len': seq_len,
         'grad_accum': layout.grad_accum, 'hbm_bytes': chip.hbm_bytes}
  if batch != preset.config.batch_size:
    out['note'] = (f'batch {preset.config.batch_size} rounded up to {batch}, a multiple of the '
                   f'{n} devices')

  memory, roofline, how = (compiled_memory(preset, batch, layout, chip) if use_compile
                           else (None, 0.0, 'not asked for (--nocompile)'))
  estimated, est_roofline, est_how = estimated_memory(preset, layout.memory, chip,
                                                      model_flops_per_step / n, how)
  if memory is None:
    memory = estimated
  if not roofline:
    roofline, how = est_roofline, (est_how if memory is estimated else f'{how}; {est_how}')
  out['mesh'] = memory.pop('mesh', layout.mesh)
  out['memory'] = memory

  if budget.mfu:
    step = model_flops_per_step / (n * chip.bf16_flops * budget.mfu)
    out['step_time'] = {'seconds': step, 'mfu': budget.mfu, 'source': budget.mfu_source}
  else:
    out['step_time'] = {'seconds': roofline, 'source': how + ': a lower bound',
                        'mfu': model_flops_per_step / (roofline * n * chip.bf16_flops)}
  tokens = budget.flops / preset.flops_per_token
  steps = math.ceil(tokens / tokens_per_step)
  out.update(tokens=tokens, steps=steps, hours=steps * out['step_time']['seconds'] / 3600)
  return out


def load_prices(path: str) -> dict:
  try:
    with open(path) as fh:
      table = json.load(fh)
  except FileNotFoundError:
    raise DataError(f'--prices={path} does not exist.') from None
  except json.JSONDecodeError as e:
    raise DataError(f'--prices={path} is not valid JSON: {e}.') from None
  if not isinstance(table.get('chips'), dict):
    raise DataError(f'--prices={path} has no "chips" table ({{"v5p": {{"on_demand": 4.2, '
                    '"spot": 1.9}}, ...}}).')
  return table


def cost(table: dict, chip: chips_lib.Chip, n_chips: int, hours: float) -> dict:
  prices = table['chips'].get(chip.name, {})
  out = {'chip_hours': n_chips * hours, 'prices_date': table.get('date', ''),
         'prices_source': table.get('source', '')}
  for kind in ('on_demand', 'spot'):
    price = prices.get(kind)
    out[kind] = None if price is None else float(price) * n_chips * hours
  return out


# ---------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------


def make_plan(f) -> dict:
  try:
    law = scaling.get_law(f.law, f.exponent)
  except ValueError as e:
    raise ConfigError(f'--law: {e}') from None
  if f.exponent and f.law != 'approach1':
    raise ConfigError('--exponent applies to --law=approach1 only.')
  if f.exponent and not 0 < f.exponent < 1:
    raise ConfigError(f'--exponent={f.exponent:g} must be in (0, 1).')
  budget = resolve_budget(f, law)
  prices = load_prices(f.prices) if budget.chip else None
  n_opt, d_opt = law.optimal(budget.flops)
  plan = {
      'budget': {'flops': budget.flops, 'source': budget.source,
                 'chip': budget.chip.name if budget.chip else None, 'chips': budget.chips},
      'law': {'name': law.name, 'source': law.source},
      'optimal': {'params': n_opt, 'tokens': d_opt, 'tokens_per_param': d_opt / n_opt,
                  'loss': law.loss(n_opt, d_opt)},
  }
  presets = load_presets()
  by_name = {p.name: p for p in presets}
  if f.preset and f.preset not in by_name:
    raise ConfigError(f'--preset={f.preset!r} is not in configs/lm.py; choose one of '
                      f'{", ".join(by_name)}.')
  listed = nearest(presets, n_opt)
  if f.preset and by_name[f.preset] not in listed:
    listed.append(by_name[f.preset])
  plan['presets'] = []
  for p in listed:
    tokens = budget.flops / p.flops_per_token
    plan['presets'].append({'name': p.name, 'params': p.params, 'active_params': p.active_params,
                            'tokens': tokens, 'tokens_per_param': tokens / p.active_params,
                            'loss': law.loss(p.active_params, tokens)})
  if budget.chip:
    chosen = by_name[f.preset] if f.preset else listed[0]
    run = plan_preset(chosen, budget, f.compile)
    run['cost'] = cost(prices, budget.chip, budget.chips, run['hours'])
    plan['run'] = run
  return plan


def _num(x: float) -> str:
  for div, unit in ((1e12, 'T'), (1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= div:
      return f'{x / div:.3g} {unit}'
  return f'{x:.3g}'


def _ratio(x: float) -> str:
  return f'{x:,.0f}' if x >= 10 else f'{x:.2g}'


def _gib(x: float) -> str:
  return f'{x / 2**30:.1f} GiB'


def _money(x: float | None) -> str:
  return 'n/a (not in the price table)' if x is None else f'${x:,.0f}'


def format_plan(plan: dict) -> str:
  b, o = plan['budget'], plan['optimal']
  lines = [f'Budget: {b["flops"]:.3g} FLOPs ({b["source"]}).',
           f'Compute-optimal ({plan["law"]["name"]}: {plan["law"]["source"]}):',
           f'  {_num(o["params"])} parameters, {_num(o["tokens"])} tokens '
           f'({o["tokens_per_param"]:.1f} per parameter), predicted loss {o["loss"]:.3f}.',
           'Nearest Kiln presets (configs/lm.py), trained on the whole budget:']
  for p in plan['presets']:
    size = _num(p['params'])
    if p['active_params'] != p['params']:
      size = f'{_num(p["active_params"])} active of {size}'
    lines.append(f'  {p["name"]:<14} {size:>10} params  {_num(p["tokens"]):>8} tokens '
                 f'({_ratio(p["tokens_per_param"])}/param)  predicted loss {p["loss"]:.3f}')
  run = plan.get('run')
  if run is None:
    lines.append('Give --chip and --chips for a mesh, memory, time and cost.')
    return '\n'.join(lines)
  m = run['memory']
  mesh = ', '.join(f'{k}={v}' for k, v in run['mesh'].items() if v != 1 or k == 'data')
  accum = f' in {run["grad_accum"]} microbatches' if run['grad_accum'] > 1 else ''
  lines += [f'Run of {run["preset"]} on {b["chips"]} x {b["chip"]}: batch {run["batch_size"]} x '
            f'{run["seq_len"]} tokens{accum}, mesh {mesh}.']
  if 'note' in run:
    lines.append(f'  ({run["note"]})')
  fits = 'fits' if m['fits'] else ('DOES NOT FIT: try model.remat=full, tensor parallelism '
                                    '(mesh.tensor), a smaller batch or more chips')
  lines.append(f'  Memory per device: {_gib(m["per_device_bytes"])} of {_gib(run["hbm_bytes"])} '
               f'HBM, {fits} [{m["source"]}].')
  if 'parts' in m:
    lines.append('    ' + ', '.join(f'{k} {_gib(v)}' for k, v in m['parts'].items()))
  else:
    lines.append('    ' + ', '.join(f'{k} {_gib(m[k + "_bytes"])}' for k in
                                     ('argument', 'output', 'temp', 'code')))
  lines += [f'    {note}' for note in m.get('notes', [])]
  s = run['step_time']
  lines += [f'  Step time {s["seconds"]:.3g} s at MFU {s["mfu"]:.3g} [{s["source"]}].',
            f'  {run["steps"]:,} steps, {_num(run["tokens"])} tokens: {run["hours"]:.3g} hours '
            f'({run["hours"] / 24:.3g} days).']
  c = run['cost']
  lines.append(f'  Cost: {c["chip_hours"]:,.0f} chip-hours, on demand {_money(c["on_demand"])}, '
               f'spot {_money(c["spot"])} (prices {c["prices_date"]}; edit launch/prices.json '
               'or pass --prices).')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# fit: a law from the user's runs.
# ---------------------------------------------------------------------------


def fit_runs(f) -> dict:
  if len(f.workdirs) < 3:
    raise ConfigError(f'fit needs --workdirs with at least 3 runs (comma-separated); got '
                      f'{len(f.workdirs)}.')
  for w in f.workdirs:  # every run's loss before any FLOP count: a bad one fails fast
    run_metrics.final_eval_loss(w)
  points = [run_metrics.read_run(w) for w in f.workdirs]
  flops, losses = [p.flops for p in points], [p.loss for p in points]
  fit = scaling.fit_loss_vs_compute(flops, losses)
  if f.predict_flops < 0:
    raise ConfigError(f'--predict_flops={f.predict_flops:g} must be positive.')
  predict = f.predict_flops or 10 * max(flops)
  plot_dir = os.path.dirname(os.path.abspath(f.plot))
  cli.check_output_dir(plot_dir, '--plot')
  os.makedirs(plot_dir, exist_ok=True)
  labels = [os.path.basename(os.path.normpath(p.workdir)) for p in points]
  scaling.plot_fit(f.plot, flops, losses, labels, fit, predict)
  notes = []
  if fit.E <= 1e-6 * min(losses):
    notes.append('E sits at its bound 0: these runs do not constrain the loss floor, so the '
                 'prediction far beyond them is loose; add runs over a wider range of compute.')
  return {'runs': [dataclasses.asdict(p) for p in points], 'fit': dataclasses.asdict(fit),
          'prediction': {'flops': predict, 'loss': float(fit.loss(predict))}, 'plot': f.plot,
          'notes': notes}


def format_fit(result: dict) -> str:
  fit = result['fit']
  lines = ['Runs (final eval loss at the compute spent by then):']
  for r in result['runs']:
    lines.append(f'  {r["workdir"]}: step {r["step"]}, {r["flops"]:.3g} FLOPs, loss '
                 f'{r["loss"]:.4f}')
  lines += [f'Fit: L(C) = {fit["E"]:.4g} + {fit["A"]:.4g} * C^-{fit["alpha"]:.4g} '
            f'(E +/- {fit["E_err"]:.2g}, alpha +/- {fit["alpha_err"]:.2g}; rms residual '
            f'{fit["rms_residual"]:.3g}).',
            f'Predicted loss at {result["prediction"]["flops"]:.3g} FLOPs: '
            f'{result["prediction"]["loss"]:.4f}.',
            f'Plot: {result["plot"]}', *result['notes']]
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  FLAGS.unparse_flags()  # back to the defaults: main may run more than once in a process
  rest = cli.parse_flags(argv, flag_values=FLAGS)

  def run():
    command = rest[1:]
    if command not in ([], ['fit']):
      raise ConfigError(f'Unknown command {" ".join(command)!r}: python -m launch.plan [flags] '
                        'plans a run, python -m launch.plan fit --workdirs=... fits your runs.')
    result = fit_runs(FLAGS) if command else make_plan(FLAGS)
    if FLAGS.json:
      print(json.dumps(result, indent=1, default=float))
    else:
      print(format_fit(result) if command else format_plan(result))

  exit_on_user_error(run)


if __name__ == '__main__':
  main(sys.argv)
