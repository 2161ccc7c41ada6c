"""Summary tables from recorded results (original.md S2F §5.6): a hand-written fixture tree in, known tables out."""
import json
import os

import pytest

from s2f_jax.errors import UserError
from s2f_jax.results import summary

from conftest import run_script

A = 'source6000:rotation4000:corruption6000:label_flip4000'
A20 = 'source6000:rotation4000:corruption6000:label_flip20000'  # the oracle's setup
B = 'source6000:corruption4000:label_flip6000:rotation4000'
CONV, RES = 'convnet 1 blocks', 'resnet 2 blocks'
SFT_NONE, SFT_EXP = 'sequential_fine_tune', 'sequential_fine_tune_exponential_lr_decay'

# setup → model → method → per seed (1, 2): (test accuracy, validation accuracy, wall seconds)
FIXTURE = {
    A: {
        CONV: {
            'erm_final_4000_samples': [(.50, .5, 10), (.52, .5, 10)],
            'erm_all': [(.55, .5, 10), (.57, .5, 10)],
            'erm_fine_tune': [(.62, .5, 10), (.66, .5, 10)],
            SFT_NONE: [(.56, .70, 10), (.58, .70, 10)],  # seed 1: best valid → test .56 (test would pick exp)
            SFT_EXP: [(.62, .60, 20), (.64, .75, 20)],  # seed 2: best valid → test .64
            'erm_fancy_new': [(.40, .5, 10), (.44, .5, 10)],  # no paper column
        },
        RES: {
            'erm_final_4000_samples': [(.70, .5, 10), (.72, .5, 10)],
            'erm_all': [(.60, .5, 10), (.64, .5, 10)],
            'erm_fine_tune': [(.83, .5, 10), (.85, .5, 10)],
            SFT_NONE: [(.80, .90, 10), (.81, .70, 10)],  # seed 1 → .80
            SFT_EXP: [(.90, .80, 20), (.92, .80, 20)],  # seed 2 → .92
            'erm_fancy_new': [(.50, .5, 10), (.50, .5, 10)],
        },
    },
    A20: {
        CONV: {'erm_final_20000_samples': [(.70, .5, 50), (.72, .5, 50)]},
        RES: {'erm_final_20000_samples': [(.88, .5, 50), (.90, .5, 50)]},
    },
    B: {
        CONV: {
            'erm_final_4000_samples': [(.50, .5, 10), (.54, .5, 20)],
            'erm_side_tune_block': [(.60, .5, 30), (.60, .5, 50)],  # ConvNet: shown as ST-1
        },
        RES: {
            'erm_final_4000_samples': [(.70, .5, 12), (.70, .5, 14)],
            'erm_side_tune': [(.74, .5, 100), (.78, .5, 110)],
            'erm_side_tune_block': [(.80, .5, 200), (.82, .5, 220)],
        },
    },
}


def row(model, method, setup, seed, test, valid, wall, **extra):
  return {'Model': model, 'Method': method, 'Shift sequence': setup, 'Seed': seed, 'Test accuracy': test,
          'Validation accuracy': valid, 'Hyper-parameters': {'learning_rate': 1e-3}, 'Wall seconds': wall, **extra}


def write_folder(path, rows, done=True):
  path.mkdir(parents=True)
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  if done:
    (path / 'DONE').touch()


@pytest.fixture
def results(tmp_path):
  """FIXTURE as a tree of finished method folders in the default layout, plus folders that must be ignored."""
  root = tmp_path / 'runs'
  for setup, models in FIXTURE.items():
    for model, methods in models.items():
      name, blocks, _ = model.split()
      for method, seeds in methods.items():
        for seed, (test, valid, wall) in enumerate(seeds, 1):
          folder = 'erm_final' if method.startswith('erm_final') else method
          rows = [row(model, method, setup, seed, test, valid, wall)]
          if (model, method, seed) == (CONV, SFT_NONE, 1):  # data.test_all_steps: only the final step counts
            rows[0]['Time step'] = 3
            rows += [row(model, method, setup, seed, .99, .99, wall, **{'Time step': t}) for t in (1, 2)]
          write_folder(root / f'{name}_{blocks}blocks_cifar10' / setup / f'seed{seed}' / folder, rows)
  seed1 = root / 'resnet_2blocks_cifar10' / A / 'seed1'
  write_folder(seed1 / 'irm_all.partial', [row(RES, 'irm_all', A, 1, .99, .99, 1)], done=False)  # killed run
  write_folder(seed1 / 'dro_all', [row(RES, 'dro_all', A, 1, .99, .99, 1)], done=False)  # not finished
  return root


def view(table, cell):
  """(mean, std, mark) as printed."""
  if not isinstance(cell, summary.Cell):
    return cell
  return (summary.fmt(cell.mean), None if cell.std is None else summary.fmt(cell.std), cell.mark)


def test_collect_reads_finished_folders_only(results):
  rows = summary.collect(str(results))
  assert len(rows) == sum(len(seeds) for models in FIXTURE.values() for methods in models.values()
                          for seeds in methods.values())
  assert not {'irm_all', 'dro_all'} & {r['Method'] for r in rows}
  assert {r['Dataset'] for r in rows} == {'cifar10'}
  assert all(r.get('Time step', 3) == 3 for r in rows)
  assert all(os.path.exists(os.path.join(r['Folder'], 'DONE')) for r in rows)


def test_table_contents_selection_by_validation_and_marks(results):
  tables = summary.summarize(summary.collect(str(results)))
  assert list(tables) == sorted([A, B])  # the oracle-only setup joins A's table
  t = tables[A]
  assert t.dataset == 'cifar10' and t.architectures == ('Conv-1', 'Res-2')
  assert t.columns == ('4k', 'ERM', 'FT', 'SFT', '20k')  # the paper's order, only those present
  assert t.other_columns == ('erm_fancy_new',)  # an unknown method is kept under its own name
  expected = {
      'Conv-1': {'4k': ('.51', '.01', ''), 'ERM': ('.56', '.01', ''), 'FT': ('.64', '.03', 'bold'),
                 'SFT': ('.60', '.06', ''), '20k': ('.71', '.01', ''), 'erm_fancy_new': ('.42', '.03', '')},
      # FT is exactly 0.02 below the row's best (SFT): within, so bold
      'Res-2': {'4k': ('.71', '.01', ''), 'ERM': ('.62', '.03', ''), 'FT': ('.84', '.01', 'bold'),
                'SFT': ('.86', '.08', 'bold'), '20k': ('.89', '.01', ''), 'erm_fancy_new': ('.50', '.00', '')},
  }
  assert {a: {c: view(t, t.cells[(a, c)]) for c in t.all_columns} for a in t.architectures} == expected
  sft = t.cells[('Conv-1', 'SFT')]
  assert sft.mean == pytest.approx((.56 + .64) / 2) and sft.std == pytest.approx(.08 / 2 ** .5)
  assert sft.seeds == (1, 2) and sft.methods == (SFT_NONE, SFT_EXP)
  assert sft.wall_seconds == pytest.approx(30.0)  # both decay variants ran for the cell
  assert t.cells[('Res-2', '20k')].methods == ('erm_final_20000_samples',)
  assert t.cells[('Res-2', '4k')].wall_seconds == pytest.approx(10.0)
  # Mean row: FT is the best column; SFT's differences to FT (.04, −.02) have mean .01 < std .03 → bold too
  assert {c: view(t, t.mean[c]) for c in t.all_columns} == {
      '4k': ('.61', None, ''), 'ERM': ('.59', None, ''), 'FT': ('.74', None, 'bold'), 'SFT': ('.73', None, 'bold'),
      '20k': ('.80', None, ''), 'erm_fancy_new': ('.46', None, '')}
  assert {c: view(t, t.std_dev[c]) for c in t.all_columns} == {
      '4k': ('.10', None, ''), 'ERM': ('.03', None, ''), 'FT': ('.10', None, ''), 'SFT': ('.13', None, ''),
      '20k': ('.09', None, ''), 'erm_fancy_new': ('.04', None, '')}
  assert t.std_dev['SFT'].mean == pytest.approx(.13)


def test_compat_selects_by_test_accuracy(results):
  t = summary.summarize(summary.collect(str(results)), compat_select_by_test=True)[A]
  assert view(t, t.cells[('Conv-1', 'SFT')]) == ('.63', '.01', 'bold')
  assert t.cells[('Conv-1', 'SFT')].methods == (SFT_EXP,)
  assert view(t, t.cells[('Res-2', 'SFT')]) == ('.91', '.01', 'bold italic')  # within .02 of the oracle's .89
  assert view(t, t.cells[('Res-2', 'FT')]) == ('.84', '.01', '')  # .07 below the new best
  assert view(t, t.cells[('Conv-1', 'FT')]) == ('.64', '.03', 'bold')


def test_validation_metric(results):
  t = summary.summarize(summary.collect(str(results)), metric='valid')[A]
  # valid .90 and .80 of the chosen runs; the oracle's valid accuracy is .5, so within .02 of it
  assert view(t, t.cells[('Res-2', 'SFT')]) == ('.85', '.07', 'bold italic')


B_MARKDOWN = f"""## {B} (cifar10)

Test accuracy, mean over seeds ± std (2+ seeds). Bold: within 0.02 of the best non-oracle method of the row; bold \
italic: within 0.02 of the oracle (20k). Mean row: marked when mean − std (over architectures) of the difference to \
the best method / the oracle is below 0. Several runs for one cell and seed (e.g. SFT lr decays): the best \
validation accuracy.

| Model | 4k | ST-1 | ST-B |
|---|---|---|---|
| Conv-1 | .52 ± .03 | **.60** ± .00 | --- |
| Res-2 | .70 ± .00 | .76 ± .03 | **.81** ± .01 |
| Mean | .61 | .68 | **.81** |
| Std dev | .09 | .08 | .00 |

Wall seconds per cell (mean over seeds):

| Model | 4k | ST-1 | ST-B |
|---|---|---|---|
| Conv-1 | 15.0 | 40.0 | --- |
| Res-2 | 13.0 | 105.0 | 210.0 |
| Mean | 14.0 | 72.5 | 210.0 |
"""

B_CSV = f"""Setup,Dataset,Model,Column,Mean,Std,Seeds,Wall seconds,Mark,Methods
{B},cifar10,Conv-1,4k,0.520000,0.028284,2,15.00,,erm_final_4000_samples
{B},cifar10,Conv-1,ST-1,0.600000,0.000000,2,40.00,bold,erm_side_tune_block
{B},cifar10,Res-2,4k,0.700000,0.000000,2,13.00,,erm_final_4000_samples
{B},cifar10,Res-2,ST-1,0.760000,0.028284,2,105.00,,erm_side_tune
{B},cifar10,Res-2,ST-B,0.810000,0.014142,2,210.00,bold,erm_side_tune_block
{B},cifar10,Mean,4k,0.610000,,,14.00,,
{B},cifar10,Mean,ST-1,0.680000,,,72.50,,
{B},cifar10,Mean,ST-B,0.810000,,,210.00,bold,
{B},cifar10,Std dev,4k,0.090000,,,,,
{B},cifar10,Std dev,ST-1,0.080000,,,,,
{B},cifar10,Std dev,ST-B,0.000000,,,,,
"""

B_LATEX = rf"""% {B} (cifar10): Test accuracy, mean over seeds $\pm$ std
\begin{{tabular}}{{lccc}}
\toprule
Model & 4k & ST-1 & ST-B \\
\midrule
Conv-1 & .52 $\pm$ .03 & \textbf{{.60}} $\pm$ .00 & --- \\
\midrule
Res-2 & .70 $\pm$ .00 & .76 $\pm$ .03 & \textbf{{.81}} $\pm$ .01 \\
\midrule
Mean & .61 & .68 & \textbf{{.81}} \\
Std dev & .09 & .08 & .00 \\
\bottomrule
\end{{tabular}}
"""


def test_renderers_exact_text(results):
  t = summary.summarize(summary.collect(str(results)))[B]
  assert summary.to_markdown(t) == B_MARKDOWN
  assert summary.to_csv(t) == B_CSV
  assert summary.to_latex(t) == B_LATEX


def test_latex_panels_and_marks(results):
  text = summary.to_latex(summary.summarize(summary.collect(str(results)))[A])
  assert text.count(r'\begin{tabular}') == 3  # panel 1 (4k..ST-B), panel 2 (SFT..20k), other methods
  assert 'Model & 4k & ERM & FT \\\\' in text and 'Model & SFT & 20k \\\\' in text
  assert r'Model & erm\_fancy\_new \\' in text
  assert r'Res-2 & \textbf{.86} $\pm$ .08 & .89 $\pm$ .01 \\' in text
  compat = summary.to_latex(summary.summarize(summary.collect(str(results)), compat_select_by_test=True)[A])
  assert r'Res-2 & \textit{\textbf{.91}} $\pm$ .01 & .89 $\pm$ .01 \\' in compat


def test_mapping_of_method_names():
  assert [summary.paper_label(m) for m in (
      'erm_all', 'irm_all', 'dro_all', 'erm_fine_tune', 'erm_linear_probe_then_fine_tune', 'irm_fine_tune',
      'dro_fine_tune', 'erm_side_tune', 'erm_side_tune_block', 'sequential_fine_tune',
      'sequential_fine_tune_linear_lr_decay', 'sequential_fine_tune_reg_all_previous_fisher',
      'sequential_side_tune', 'sequential_side_tune_block', 'joint_model_adjacent_reg_l2',
      'joint_model_side_tune_all_layers_efficient_adjacent_reg_none',
      'joint_model_side_tune_block_adjacent_reg_none')] == [
      'ERM', 'IRM', 'DRO', 'FT', 'LP-FT', 'I-FT', 'D-FT', 'ST-1', 'ST-B', 'SFT', 'SFT', 'EWC', 'SST-1', 'SST-B', 'JM',
      'JST-1', 'JST-B']
  for other in ('erm_fine_tune_fc', 'sequential_fine_tune_fc_exponential_lr_decay', 'joint_model_adjacent_reg_l1',
                'erm_side_tune_all_layers_efficient', 'joint_model_adjacent_reg_l2_resumed', 'erm_all_weighted'):
    assert summary.paper_label(other) is None, other
  assert summary.LABELS == ('4k', 'ERM', 'IRM', 'DRO', 'FT', 'LP-FT', 'I-FT', 'D-FT', 'ST-1', 'ST-B', 'SFT', 'EWC',
                            'SST-1', 'SST-B', 'JM', 'JST-1', 'JST-B', '20k')
  assert [summary.architecture_label(m) for m in ('convnet 4 blocks', 'densenet 1 blocks', 'resnet 3 blocks',
                                                  'mlp')] == ['Conv-4', 'Dense-1', 'Res-3', 'mlp']


def test_row_order_convnet_side_tune_sizes_and_datasets():
  rows = [row(m, 'erm_final_1000_samples', 'portraits', 1, .5, .5, 1) for m in
          ('resnet 1 blocks', 'densenet 2 blocks', 'convnet 3 blocks', 'mlp', 'convnet 1 blocks')]
  rows += [row('convnet 1 blocks', 'erm_side_tune', 'portraits', 1, .6, .5, 1),  # ConvNet one-conv: other
           row('convnet 1 blocks', 'erm_final_5000_samples', 'portraits', 1, .9, .5, 1),  # larger n: oracle
           row('resnet 1 blocks', 'erm_final_200_samples', 'source50:rotation200', 1, .4, .5, 1)]
  rows = [dict(r, Dataset='portraits' if r['Shift sequence'] == 'portraits' else 'digits') for r in rows]
  rows.append(dict(row('resnet 1 blocks', 'erm_all', 'source50:rotation200', 1, .3, .5, 1), Dataset='cifar10'))
  tables = summary.summarize(rows)
  assert list(tables) == ['cifar10_source50:rotation200', 'digits_source50:rotation200', 'portraits']
  t = tables['portraits']
  assert t.architectures == ('Conv-1', 'Conv-3', 'Dense-2', 'Res-1', 'mlp')
  assert t.columns == ('4k', '20k') and t.other_columns == ('erm_side_tune',)
  assert view(t, t.cells[('Conv-1', 'erm_side_tune')]) == ('.60', None, 'bold')  # above the row's best (4k)
  # an oracle-size setup alone (no smaller setup with the same steps) keeps its own table, its n as "4k"
  assert tables['digits_source50:rotation200'].columns == ('4k',)
  assert tables['cifar10_source50:rotation200'].columns == ('ERM',)
  with pytest.raises(UserError, match='metric'):
    summary.summarize(rows, metric='train')


def run_summarize(*args):
  return run_script('experiments/summarize.py', *args, timeout=120)


def test_cli_writes_tables(results):
  proc = run_summarize(f'--root={results}')
  assert proc.returncode == 0, proc.stderr
  out = results / 'summary'
  assert sorted(os.listdir(out)) == sorted(f'{s}.{e}' for s in (A, B) for e in ('md', 'csv', 'tex'))
  assert (out / f'{B}.md').read_text() == B_MARKDOWN
  assert (out / f'{B}.csv').read_text() == B_CSV
  assert (out / f'{B}.tex').read_text() == B_LATEX
  assert f'## {A} (cifar10)' in proc.stdout and B_MARKDOWN in proc.stdout
  again = run_summarize(f'--root={results}', '--compat_select_by_test')  # the summary folder itself is not read
  assert again.returncode == 0, again.stderr
  assert '***.91*** ± .01' in (out / f'{A}.md').read_text()


@pytest.mark.parametrize('case', ['empty', 'missing', 'no flag'])
def test_cli_user_errors(tmp_path, case):
  (tmp_path / 'unfinished').mkdir()
  (tmp_path / 'unfinished' / 'metrics.jsonl').write_text('{}\n')  # no DONE: not a result
  args = {'empty': [f'--root={tmp_path}'], 'missing': [f'--root={tmp_path / "nope"}'], 'no flag': []}[case]
  proc = run_summarize(*args)
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'summary').exists()
