"""The command line: bad input → one line + exit 2 + nothing written; a real run's files; skip and resume."""
import csv
import json

import pytest

from conftest import assert_user_error, forked_runs, run_script

TINY = ['--config=configs/default.py', '--config.model.width=8', '--config.num_epochs=2',
        '--config.data.source_size=200', '--config.data.target_sizes=100', '--config.data.test_size=100']


def run_main(args, workdir, script='experiments/main.py'):
  return run_script(script, f'--workdir={workdir}', *args)


BAD_INPUTS = {
    'misspelled shift': (['--config.data.shift_sequence=rotaton:corruption'], ['rotaton', 'rotation_cond']),
    'unknown method': (['--config.method=erm_finale'], ['erm_finale', 'erm_final', 'sequential_fine_tune']),
    'unknown model': (['--config.model.name=vgg'], ['vgg', 'convnet', 'resnet', 'densenet']),
    'zero blocks': (['--config.model.num_blocks=0'], ['model.num_blocks', '0']),
    'negative size': (['--config.data.source_size=-5'], ['-5']),
    'oversize': (['--config.data.source_size=100000'], ['source', '10000', '148']),
    'missing root': (['--config.data.name=cifar10', '--config.data.root=/nonexistent/cifar'], ['/nonexistent/cifar']),
    'no root': (['--config.data.name=cifar10'], ['data.root']),
    'unknown dataset': (['--config.data.name=mnist'], ['mnist', 'digits']),
    'unknown layer': (['--config.fine_tune.layers=layer9,fc'], ['layer9', 'conv1', 'layer1', 'fc']),
    'malformed override': (['--config.num_epochs=abc'], ['abc']),
    'unknown key': (['--config.nonsense=1'], ['nonsense', 'valid keys', 'num_epochs', 'method']),
    'unknown nested key': (['--config.data.shifts=warp'], ['data.shifts', "under 'data'", 'shift_sequence']),
    'missing config file': (['--config=configs/nope.py'], ['nope.py']),
    'unknown loss samples': (['--config.joint.loss_samples=nearest'], ['nearest', 'nearest neighbors', 'optimal']),
    'unknown regularization': (['--config.fine_tune.regularization=fisher_al'], ['fisher_al', 'fisher_all', 'previous_l1']),
    'unknown fine-tune mode': (['--config.fine_tune.mode=side'], ['side', 'side_tune', 'low_rank_adapt']),
    'per-step spec count': (['--config.method=sequential_fine_tune', '--config.fine_tune.layers=fc:all'],
                            ['fc:all', '2 per-step specs', '3 target steps']),
    'bad side sizes': (['--config.fine_tune.mode=side_tune', '--config.adapter.side_layer_sizes=8,x'], ['8,x', 'block']),
    'unknown joint mode': (['--config.method=joint_model', '--config.joint.mode=side'],
                           ['side', 'separate', 'side_tune', 'low_rank_adapt']),
    'unknown adjacent type': (['--config.method=joint_model', '--config.joint.adjacent_reg_type=l3'],
                              ['l3', 'l2_fisher', 'l2_very_high']),
    'unknown separate layer': (['--config.method=joint_model', '--config.joint.separate_layers=conv1,layer7'],
                               ['layer7', 'conv1', 'layer1', 'fc']),
    'separate layers in side mode': (['--config.method=joint_model', '--config.joint.mode=side_tune',
                                      '--config.joint.separate_layers=fc'], ['fc', 'joint.mode=separate']),
    'unused adjacent grid': (['--config.method=joint_model', '--config.joint.adjacent_reg_type=none',
                              '--config.joint.adjacent=(5.0,)'], ['joint.adjacent=(5.0,)', 'adjacent_reg_type=none']),
    'non-positive final weight': (['--config.method=joint_model', '--config.joint.last_step_loss_weight=-1'],
                                  ['last_step_loss_weight=-1', 'positive']),
    'efficient sweep without sides': (['--config.method=joint_model', '--config.joint.sweep_efficient_reg=true'],
                                      ['sweep_efficient_reg', 'side_tune', 'low_rank_adapt']),
    'debug mirror with dro': (['--config.method=dro_fine_tune', '--config.debug.joint_mirror=standard_using_joint'],
                              ['debug.joint_mirror=standard_using_joint', 'erm_fine_tune']),
    'debug mirror as a fine-tune mode': (['--config.method=erm_fine_tune', '--config.fine_tune.mode=standard_using_joint'],
                                         ['fine_tune.mode=standard_using_joint', 'debug.joint_mirror']),
    'too many densenet blocks': (['--config.model.name=densenet', '--config.model.num_blocks=4'],
                                 ['model.num_blocks=4', 'densenet', '16×16', 'valid: 1, 2, 3']),
    'seed too large': (['--config.seed=5000000000'], ['seed=5000000000', '2**32']),
    'linear decay past zero': (['--config.method=sequential_fine_tune', '--config.fine_tune.learning_rate_decay=linear',
                                '--config.data.shift_sequence=' + ':'.join(['rotation'] * 10)],
                               ['fine_tune.learning_rate_decay=linear', 'step 10', 'exponential']),
    'adapter rank too large': (['--config.method=erm_fine_tune', '--config.fine_tune.mode=low_rank_adapt',
                                '--config.adapter.rank=500'], ['500', 'layer1', 'largest valid rank']),
}


CONFIG_BUGS = {  # a config file's body → (line, what the one-line error names)
    'division': ('from configs import default\n\n\ndef get_config():\n  c = default.get_config()\n'
                 '  c.num_epochs = 1 / 0\n  return c\n', 6, 'ZeroDivisionError: division by zero'),
    'syntax': ('def get_config(:\n  pass\n', 1, 'SyntaxError'),
}


@pytest.fixture(scope='module')
def bad_runs(tmp_path_factory):
  """Every case of BAD_INPUTS and CONFIG_BUGS through experiments/main.py in forked children: (the folder of the
  config files, case → (exit code, stderr, whether its workdir exists))."""
  root = tmp_path_factory.mktemp('bad_inputs')
  cases = {case: args if args[0].startswith('--config=') else TINY + args for case, (args, _) in BAD_INPUTS.items()}
  for case, (body, _, _) in CONFIG_BUGS.items():
    (root / f'{case}.py').write_text(body)
    for override in (False, True):
      cases[f'{case} {override}'] = [f'--config={root / case}.py', *(['--config.seed=3'] if override else [])]
  return root, forked_runs('experiments/main.py', cases, root / 'work', '--workdir')


@pytest.mark.parametrize('case', sorted(CONFIG_BUGS))
@pytest.mark.parametrize('override', [False, True])
def test_config_file_bug_names_file_and_line(case, override, bad_runs):
  root, runs = bad_runs
  code, stderr, wrote = runs[f'{case} {override}']
  _, line, message = CONFIG_BUGS[case]
  assert code == 2 and 'Traceback' not in stderr, stderr[-2000:]
  assert len(stderr.strip().splitlines()) == 1, stderr
  assert stderr.startswith(f'error: config file {root / case}.py, line {line}: {message}'), stderr
  assert not wrote


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_runs):
  code, stderr, wrote = bad_runs[1][case]
  assert_user_error(code, stderr, BAD_INPUTS[case][1])
  assert 'Traceback' not in stderr and not wrote


@pytest.mark.parametrize('case', ['unknown key', 'oversize'])
def test_bad_input_in_a_fresh_process(case, tmp_path):
  """The forked children above behave as fresh processes: two cases checked in real ones."""
  args, must_mention = BAD_INPUTS[case]
  proc = run_main(TINY + args, tmp_path / 'work')
  assert_user_error(proc.returncode, proc.stderr, must_mention)
  assert not (tmp_path / 'work').exists()


def test_half_prepared_tfds_root_is_one_line_exit_2(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  (tmp_path / 'tfds' / 'mnist' / '3.0.1').mkdir(parents=True)  # a variant folder without dataset_info.json
  workdir = tmp_path / 'work'
  proc = run_main(TINY + ['--config.data.name=tfds:mnist', f'--config.data.root={tmp_path / "tfds"}'], workdir)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()]
  assert proc.stderr.startswith('error: tfds:mnist: not prepared under') and not workdir.exists()


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_main_writes_results_then_skips_finished_run(tmp_path):
  workdir = tmp_path / 'work'
  proc = run_main(TINY + ['--config.method=erm_final,erm_all'], workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'erm_final_100_samples' in proc.stdout and 'erm_all' in proc.stdout
  for method, num_steps in (('erm_final', 1), ('erm_all', 4)):
    d = workdir / method
    assert (d / 'DONE').exists() and not (workdir / f'{method}.partial').exists()
    rows = read_csv(d / 'metrics.csv')
    assert len(rows) == 1
    row = rows[0]
    assert list(row)[:5] == ['Model', 'Method', 'Shift sequence', 'Seed', 'Test accuracy']
    assert row['Model'] == 'convnet 1 blocks' and row['Seed'] == '1007'
    assert row['Shift sequence'] == 'source200:rotation100:corruption100:label_flip100'
    assert 0.0 <= float(row['Test accuracy']) <= 1.0
    grid = json.loads(row['Grid validation accuracies'])
    assert len(grid) == 8 and max(grid) == pytest.approx(float(row['Validation accuracy']))
    for key in ('Hyper-parameters', 'Wall seconds', 'Examples per second', 'Device', 'jax version', 'flax version'):
      assert row[key]
    config = json.loads((d / 'config.json').read_text())
    assert config['config']['method'] == method and config['metadata']['jax']
    history = [json.loads(line) for line in (d / 'history.jsonl').read_text().splitlines()]
    assert {h['run'] for h in history} == set(range(8))
    assert all(0 <= h['epoch'] <= 2 for h in history)
  combined = read_csv(workdir / 'metrics.csv')  # every finished method of the workdir, this call's order
  assert [r['Method'] for r in combined] == ['erm_final_100_samples', 'erm_all']
  assert combined[1] == read_csv(workdir / 'erm_all' / 'metrics.csv')[0]
  mtime = (workdir / 'erm_final' / 'metrics.csv').stat().st_mtime
  again = run_main(TINY + ['--config.method=erm_final'], workdir)
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'skipping' in again.stderr
  assert (workdir / 'erm_final' / 'metrics.csv').stat().st_mtime == mtime
  assert [r['Method'] for r in read_csv(workdir / 'metrics.csv')] == ['erm_final_100_samples', 'erm_all']
  first = next(line for line in proc.stdout.splitlines() if line.startswith('erm_final'))
  assert first.split()[:3] == next(line for line in again.stdout.splitlines() if line.startswith('erm_final')).split()[:3]


@pytest.mark.slow
def test_fine_tuning_variant_from_the_cli(tmp_path):
  """A paper-method config file on the embedded data: its full method name, directory and a sane accuracy."""
  result = run_main(['--config=configs/linear_probe_fine_tune.py', '--config.data.name=digits',
                     '--config.data.image_size=16', '--config.model.name=convnet', '--config.model.num_blocks=1',
                     '--config.model.width=8', '--config.num_epochs=2', '--config.data.source_size=200',
                     '--config.data.target_sizes=100', '--config.data.test_size=100',
                     '--config.grid.learning_rate=(0.001,)', '--config.grid.dropout=(0.0,)'], tmp_path)
  assert result.returncode == 0, result.stderr
  assert 'erm_linear_probe_then_fine_tune' in result.stdout
  with open(tmp_path / 'erm_linear_probe_then_fine_tune' / 'metrics.csv') as f:
    (row,) = list(csv.DictReader(f))
  assert row['Method'] == 'erm_linear_probe_then_fine_tune' and row['Tuned layers'] == 'fc-all'
  assert 0.0 <= float(row['Test accuracy']) <= 1.0


def test_show_sequence_writes_png(tmp_path):
  out = tmp_path / 'seq.png'
  proc = run_script('experiments/show_sequence.py', *TINY, f'--out={out}', timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
