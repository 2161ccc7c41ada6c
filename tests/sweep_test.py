"""Sweeps: the job lists of the sweep configs, slicing and --only, skip / resume / failure records, shared-stage
locks, and the command line (dry run, bad input)."""
import collections
import fcntl
import json
import os

import ml_collections
import pytest

import numpy as np

from s2f_jax import experiment, sweep
from s2f_jax.errors import UserError
from s2f_jax.methods import METHODS, Method
from s2f_jax.results import read_metrics, summary
from s2f_jax.training import merged

from conftest import assert_user_error, forked_runs, run_script, SMALL, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(ROOT, 'configs', 'sweeps')


def load(name):
  return sweep.load_config(os.path.join(SWEEPS, name))


@pytest.fixture(scope='module')
def rcl_jobs():
  return sweep.jobs(load('rcl.py'))


# ------------------------------------------------------------------------------------------- job lists


@pytest.mark.parametrize('name,full,quick,quick_all', [
    ('rcl', 240, 6, 20), ('clr', 240, 6, 20), ('rrr', 240, 6, 20), ('ttt', 240, 6, 20), ('sss', 240, 6, 20),
    ('portraits', 228, 5, 19), ('rotation_length', 1680, 12, 140)])
def test_every_sweep_config_builds_its_jobs(name, full, quick, quick_all):
  counts = {arg: len(sweep.jobs(load(f'{name}.py{arg}'))) for arg in ('', ':quick', ':quick_all')}
  assert counts == {'': full, ':quick': quick, ':quick_all': quick_all}
  for job in sweep.jobs(load(f'{name}.py:quick')):
    c = job.config
    assert (c.data.name, c.model.name, c.model.num_blocks, c.model.width) == ('digits', 'convnet', 1, 8)
    assert c.num_epochs == 2
    assert len(tuple(c.grid.learning_rate) + tuple(c.grid.weight_decay) + tuple(c.grid.dropout)) == 3


def test_paper_grid_of_the_rcl_sweep(rcl_jobs):
  keys = [j.key for j in rcl_jobs]
  assert {(k['model'], k['blocks']) for k in keys} == {(m, b) for m in ('convnet', 'densenet', 'resnet')
                                                       for b in (1, 2, 3, 4)}
  per_model = collections.Counter((k['model'], k['blocks']) for k in keys)
  assert set(per_model.values()) == {20}  # 19 variants + the oracle
  assert {k['seed'] for k in keys} == {1007} and {k['sequence'] for k in keys} == {'RCL'}
  for job in rcl_jobs:
    c = job.config
    assert c.data.name == 'cifar10' and c.data.shift_sequence == 'rotation:corruption:label_flip'
    assert (c.data.source_size, c.data.test_size, c.num_epochs) == (6000, 5000, 100)
    oracle = job.key['variant'] == 'oracle'
    assert c.data.target_sizes == ('4000:6000:20000' if oracle else '4000:6000:4000')
    assert job.folder.split(os.sep)[1].endswith('label_flip20000' if oracle else 'label_flip4000')
    assert c.method == job.key['method'] and (not oracle or c.method == 'erm_final')
  # one run folder per (model, blocks) and one per oracle, so variants share their cached stages
  assert len({j.folder for j in rcl_jobs}) == 24
  variants = {j.key['variant']: j.config for j in rcl_jobs if j.key['model'] == 'resnet' and j.key['blocks'] == 4}
  assert variants['LP-FT'].fine_tune.layers == 'linear_probe_fine_tune'
  assert variants['EWC'].fine_tune.regularization == 'fisher_all' and variants['EWC'].fine_tune.learning_rate_decay == 'none'
  assert variants['ST-B'].fine_tune.mode == 'side_tune' and variants['ST-B'].adapter.side_layer_sizes == 'block'
  assert variants['JST-1'].joint.mode == 'side_tune' and variants['JST-1'].joint.adjacent_reg_type == 'none'
  assert {variants[v].fine_tune.learning_rate_decay for v in ('SFT', 'SFT-linear', 'SFT-exponential')} == {
      'none', 'linear', 'exponential'}


def test_paper_sweep_fills_every_column_of_the_summary(rcl_jobs, tmp_path):
  """A fake result per job of the full RCL sweep (12 architectures): the summary, taking each result's column from the
  recorded job list, fills all 18 paper columns of all 12 rows, puts each job's number in its own variant's column,
  and leaves nothing for the "other" section."""
  root = str(tmp_path)
  sweep.write_columns(rcl_jobs, root, 'rcl')
  expected = {}
  for k, job in enumerate(rcl_jobs):
    (method_dir,) = job.method_dirs(root)
    c = job.config
    name = os.path.basename(method_dir)
    if c.method == 'erm_final':  # the folder is erm_final, the row's method names the final-step size
      name = f"erm_final_{c.data.target_sizes.split(':')[-1]}_samples"
    accuracy = round(0.1 + k / 1000, 4)  # distinct per job, larger for later variants (SFT-exponential > SFT)
    os.makedirs(method_dir)
    with open(os.path.join(method_dir, 'metrics.jsonl'), 'w') as f:
      f.write(json.dumps({'Method': name, 'Model': f'{c.model.name} {c.model.num_blocks} blocks',
                          'Shift sequence': sweep.setup_name(c), 'Seed': c.seed, 'Test accuracy': accuracy,
                          'Validation accuracy': accuracy}) + '\n')
    open(os.path.join(method_dir, 'DONE'), 'w').close()
    label = {'SFT-linear': 'SFT', 'SFT-exponential': 'SFT', 'oracle': '20k'}.get(job.key['variant'],
                                                                                 job.key['variant'])
    architecture = summary.architecture_label(f'{c.model.name} {c.model.num_blocks} blocks')
    expected[(architecture, label)] = max(expected.get((architecture, label), 0), accuracy)
  tables = summary.summarize(summary.collect(root))
  (table,) = tables.values()
  assert table.columns == summary.LABELS and table.other_columns == ()
  assert table.architectures == tuple(f'{f}-{b}' for f in ('Conv', 'Dense', 'Res') for b in (1, 2, 3, 4))
  assert len(expected) == 12 * 18
  assert {key: cell.mean for key, cell in table.cells.items()} == pytest.approx(expected)


def test_run_folder_is_the_default_workdir_layout():
  config = tiny_config()
  sequence = experiment.load_sequence(config)
  assert os.path.join('runs', sweep.run_folder(config)) == experiment.default_workdir(config, sequence)


def test_slicing_covers_every_job_exactly_once(rcl_jobs):
  for jobs in (rcl_jobs, sweep.jobs(load('rotation_length.py:quick'))):
    for n in range(1, 6):
      slices = [sweep.select(jobs, i, n) for i in range(n)]
      taken = collections.Counter(id(j) for s in slices for j in s)
      assert set(taken) == {id(j) for j in jobs} and set(taken.values()) == {1}
      assert max(map(len, slices)) - min(map(len, slices)) <= 1
      for i, s in enumerate(slices):  # job k goes to task k mod n
        assert [jobs.index(j) % n for j in s] == [i] * len(s)


def test_only_filters_and_bad_selections(rcl_jobs):
  assert len(sweep.select(rcl_jobs, only=['model=resnet'])) == 80
  assert len(sweep.select(rcl_jobs, only=['model=convnet', 'blocks=2'])) == 20
  picked = sweep.select(rcl_jobs, only=['variant=FT', 'variant=oracle'])
  assert len(picked) == 24 and {j.key['variant'] for j in picked} == {'FT', 'oracle'}
  assert len(sweep.select(rcl_jobs, only=['method=erm_final', 'seed=1007'])) == 24  # 4k and the oracle
  sliced = [sweep.select(rcl_jobs, i, 3, ['model=densenet']) for i in range(3)]
  assert sorted(map(len, sliced)) == [26, 27, 27]
  with pytest.raises(UserError) as e:
    sweep.select(rcl_jobs, only=['arch=resnet'])
  assert "'arch'" in str(e.value) and all(k in str(e.value) for k in sweep.KEY_FIELDS)
  with pytest.raises(UserError, match="vgg.*convnet, densenet, resnet"):
    sweep.select(rcl_jobs, only=['model=vgg'])
  with pytest.raises(UserError, match='KEY=VALUE'):
    sweep.select(rcl_jobs, only=['model'])
  with pytest.raises(UserError, match=r'--task_index=2 .* 0\.\.1'):
    sweep.select(rcl_jobs, 2, 2)


def test_bad_sweep_definitions_are_user_errors():
  with pytest.raises(UserError, match=r"nope\.py.*rcl\.py"):
    sweep.load_config(os.path.join(SWEEPS, 'nope.py'))
  with pytest.raises(UserError, match='fast.*quick_all'):
    load('rcl.py:fast')
  bad = tiny_sweep()
  bad.variants = (('X', {'method': 'erm_finale'}),)
  with pytest.raises(UserError, match="erm_finale.*erm_final"):
    sweep.jobs(bad)
  bad.variants = (('X', {'data.sorce_size': 5}),)
  with pytest.raises(UserError, match='sorce_size'):
    sweep.jobs(bad)
  bad.variants = (('A', {'method': 'erm_all'}), ('B', {'method': 'erm_all'}))  # both write erm_all/
  with pytest.raises(UserError, match='both write'):
    sweep.jobs(bad)


# -------------------------------------------------------------------------------------------- running


def tiny_sweep(methods=('erm_final',), sequences=2) -> ml_collections.ConfigDict:
  """Two-step digits sequences (rotation:corruption, corruption:rotation; same sizes, so the second job reuses the
  first one's compiled programs), width-8 1-block ConvNet, 2 epochs, one grid point; one job per sequence."""
  c = ml_collections.ConfigDict()
  c.name = 'tiny'
  c.base = tiny_config(**SMALL)
  c.sequences = ({'name': 'RC'}, {'name': 'CR', 'data.shift_sequence': 'corruption:rotation'})[:sequences]
  c.models, c.num_blocks, c.seeds = ('convnet',), (1,), (1007,)
  c.methods, c.variants, c.oracle_final_size = tuple(methods), (), 0
  return c


def status_lines(root):
  with open(os.path.join(root, sweep.STATUS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_sweep_runs_then_skips_and_records_failures(tmp_path, monkeypatch):
  jobs = sweep.jobs(tiny_sweep())
  root = str(tmp_path / 'sweep')
  assert sweep.run_sweep(jobs, root) == {'done': 2, 'skipped': 0, 'failed': 0}
  metrics = [os.path.join(j.workdir(root), 'erm_final', 'metrics.csv') for j in jobs]
  mtimes = [os.stat(m).st_mtime_ns for m in metrics]
  first = status_lines(root)
  assert [(s['key']['sequence'], s['status']) for s in first] == [('RC', 'done'), ('CR', 'done')]
  assert all(0 <= s['results']['erm_final_150_samples'] <= 1 and s['seconds'] > 0 for s in first)

  calls = []
  monkeypatch.setattr(experiment, 'run', lambda *a, **k: calls.append(a))
  assert sweep.run_sweep(jobs, root) == {'done': 0, 'skipped': 2, 'failed': 0}
  assert calls == [] and [os.stat(m).st_mtime_ns for m in metrics] == mtimes
  assert [s['status'] for s in status_lines(root)[2:]] == ['skipped', 'skipped']
  monkeypatch.undo()

  # a failing job is recorded and the next one still runs
  original = experiment.run

  def flaky(config, workdir=None):
    if config.data.shift_sequence == 'rotation:corruption':
      raise RuntimeError('boom\nsecond line')
    return original(config, workdir)
  monkeypatch.setattr(experiment, 'run', flaky)
  other = str(tmp_path / 'other')
  assert sweep.run_sweep(jobs, other) == {'done': 1, 'skipped': 0, 'failed': 1}
  with open(os.path.join(other, sweep.FAILURES_FILE)) as f:
    (failure,) = [json.loads(line) for line in f]
  assert failure['key'] == jobs[0].key and failure['error'] == 'RuntimeError'
  assert failure['message'] == 'boom second line' and 'Traceback' in failure['traceback'] and failure['time']
  assert [s['status'] for s in status_lines(other)] == ['failed', 'done']
  assert sweep.job_state(jobs[0], other) == 'new' and sweep.job_state(jobs[1], other) == 'finished'


def test_interrupted_job_resumes_without_retraining_finished_methods(tmp_path, monkeypatch):
  (job,) = sweep.jobs(tiny_sweep(methods=('erm_final,erm_all',), sequences=1))
  root = str(tmp_path)

  def interrupted(ctx):
    raise KeyboardInterrupt
  monkeypatch.setitem(METHODS, 'erm_all', Method(interrupted, 'interrupted'))
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep([job], root)
  workdir = job.workdir(root)
  metrics = os.path.join(workdir, 'erm_final', 'metrics.csv')
  assert os.path.exists(os.path.join(workdir, 'erm_final', 'DONE')) and sweep.job_state(job, root) == 'started'
  mtime = os.stat(metrics).st_mtime_ns
  monkeypatch.undo()
  assert sweep.run_sweep([job], root) == {'done': 1, 'skipped': 0, 'failed': 0}
  assert os.stat(metrics).st_mtime_ns == mtime and sweep.job_state(job, root) == 'finished'
  (line,) = status_lines(root)
  assert set(line['results']) == {'erm_final_150_samples', 'erm_all'}


def test_job_waits_while_another_task_trains_its_shared_stage(tmp_path, monkeypatch):
  c = tiny_sweep(sequences=1)
  c.methods = ()
  c.variants = (('FT', {'method': 'erm_fine_tune'}),
                ('LP-FT', {'method': 'erm_fine_tune', 'fine_tune.layers': 'linear_probe_fine_tune'}),
                ('ERM', {'method': 'erm_all'}))
  jobs = sweep.jobs(c)
  root = str(tmp_path)
  (lock_path,) = sweep._lock_paths(jobs[0], root)
  assert sweep._lock_paths(jobs[1], root) == [lock_path] and sweep._lock_paths(jobs[2], root) == []
  os.makedirs(os.path.dirname(lock_path))
  other_task = open(lock_path, 'a')
  fcntl.flock(other_task, fcntl.LOCK_EX)  # another task is training erm_all_prev in this folder
  order = []

  def fake_run(config, workdir=None):
    order.append(config.method + ('/lp' if config.fine_tune.layers != 'all' else ''))
    if config.method == 'erm_all':
      fcntl.flock(other_task, fcntl.LOCK_UN)  # the other task finishes meanwhile
    return []
  monkeypatch.setattr(experiment, 'run', fake_run)
  assert sweep.run_sweep(jobs, root) == {'done': 3, 'skipped': 0, 'failed': 0}
  assert order == ['erm_all', 'erm_fine_tune', 'erm_fine_tune/lp']
  other_task.close()


@pytest.mark.slow
def test_seeds_together_merge_fits_and_equal_seeds_apart(tmp_path, monkeypatch):
  c = tiny_sweep(methods=('erm_final,erm_fine_tune',), sequences=1)
  c.seeds = (1007, 1008)
  jobs = sweep.jobs(c)
  assert [len(g) for g in sweep.seed_groups(jobs)] == [2]
  slots = []
  original = merged.fit

  def spy(*args, **kwargs):
    slots.append(len(args[4]) if isinstance(args[4], list) else 1)
    return original(*args, **kwargs)
  monkeypatch.setattr(merged, 'fit', spy)
  apart, together = str(tmp_path / 'apart'), str(tmp_path / 'together')
  assert sweep.run_sweep(jobs, apart, seeds_together=False)['done'] == 2
  assert slots == [1] * 6  # per seed: erm_final, the history model, the fine-tuning stage
  slots.clear()
  assert sweep.run_sweep(jobs, together)['done'] == 2
  assert slots == [2] * 3  # each stage once, both seeds' data as slots
  for job in jobs:
    for method in ('erm_final', 'erm_fine_tune'):
      a, b = (read_metrics(os.path.join(job.workdir(root), method)) for root in (apart, together))
      for ra, rb in zip(a, b):
        assert ra['Hyper-parameters'] == rb['Hyper-parameters'] and ra['Seed'] == rb['Seed'] == job.key['seed']
        assert abs(ra['Test accuracy'] - rb['Test accuracy']) < 1e-9
        np.testing.assert_allclose(ra['Grid validation accuracies'], rb['Grid validation accuracies'], atol=1e-9)
  # the seeds really differ (each draws its own data)
  accs = [read_metrics(os.path.join(j.workdir(together), 'erm_final'))[0]['Test accuracy'] for j in jobs]
  assert accs[0] != accs[1]
  assert [s['together'] for s in status_lines(together)] == [2, 2]

  def flaky(config, workdir=None, batcher=None):  # one seed fails; the other still finishes
    if config.seed == 1008:
      raise RuntimeError('boom')
    return [{'Method': 'm', 'Test accuracy': 0.5}]
  monkeypatch.setattr(experiment, 'run', flaky)
  other = str(tmp_path / 'other')
  assert sweep.run_sweep(jobs, other) == {'done': 1, 'skipped': 0, 'failed': 1}
  assert [s['status'] for s in status_lines(other)] == ['done', 'failed']


# --------------------------------------------------------------------------------------------- command line


def run_cli(*args):
  return run_script('experiments/sweep.py', *args, timeout=300)


def test_cli_dry_run_lists_jobs_and_writes_nothing(tmp_path):
  root = tmp_path / 'root'
  proc = run_cli('--config=configs/sweeps/rcl.py:quick', f'--root={root}', '--dry_run')
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 7 and lines[-1].startswith('6 jobs')
  assert [line.split()[1] for line in lines[:6]] == ['new'] * 6
  assert {line.split()[5] for line in lines[:6]} == {'variant=4k', 'variant=ERM', 'variant=FT', 'variant=SFT',
                                                     'variant=JM', 'variant=oracle'}
  assert all(str(root) in line for line in lines[:6]) and 'label_flip500' in lines[5]
  assert not root.exists()
  sliced = run_cli('--config=configs/sweeps/rcl.py', f'--root={root}', '--dry_run', '--only=model=resnet',
                   '--task_index=1', '--num_tasks=4')
  assert sliced.returncode == 0 and sliced.stdout.strip().splitlines()[-1].startswith('20 jobs (task 1 of 4; 240')


BAD_INPUTS = [
    (['--config=configs/sweeps/rcl.py:quick', '--only=arch=resnet'], ['arch', 'sequence', 'variant', 'seed']),
    (['--config=configs/sweeps/rcl.py:quick', '--task_index=5', '--num_tasks=2'], ['--task_index=5', '0..1']),
    (['--config=configs/sweeps/nope.py'], ['nope.py', 'configs/sweeps/rcl.py', 'rotation_length.py']),
    (['--config=configs/sweeps/rcl.py:fast'], ['fast', 'quick', 'quick_all']),
    (['--config=configs/sweeps/rcl.py', '--only=variant=4k'], ['cifar10', '--config.base.data.root']),
]


@pytest.fixture(scope='module')
def bad_runs(tmp_path_factory):
  """Each BAD_INPUTS command line through experiments/sweep.py in a forked child: str(index) → (exit code, stderr,
  whether its root exists)."""
  return forked_runs('experiments/sweep.py', {str(i): args for i, (args, _) in enumerate(BAD_INPUTS)},
                     tmp_path_factory.mktemp('bad_sweeps'), '--root')


@pytest.mark.parametrize('case', range(len(BAD_INPUTS)))
def test_cli_bad_input_is_one_line_exit_2(bad_runs, case):
  code, stderr, wrote = bad_runs[str(case)]
  assert_user_error(code, stderr, BAD_INPUTS[case][1])
  assert not wrote
