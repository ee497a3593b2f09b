"""Installing kdjax beside a JAX within its declared range installs no other JAX.

A user's JAX often comes with an accelerator plugin (jax-cuda*-plugin, libtpu) built for that one
jaxlib: a `pip install -e .` that replaced jax or jaxlib would break it. So kdjax declares ranges,
and here pip resolves kdjax, dependencies included, in the environment running the tests and must
keep the JAX it finds. pip reads the index for this (it builds kdjax's metadata with setuptools
in an isolated build environment and looks up any requirement not already met): the test needs
the package registry, as CI has it.
"""

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

JAX = ('jax', 'jaxlib')


def declared_requirements():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  return {canonicalize_name(r.name): r for r in map(Requirement, project['dependencies'])}


def test_installed_jax_satisfies_the_declared_range():
  requirements = declared_requirements()
  for name in JAX:
    installed = metadata.version(name)
    assert requirements[name].specifier.contains(installed, prereleases=True), (
        f'{name} {installed} is installed but pyproject.toml declares {requirements[name]}')


def resolve_kdjax(tmp_path):
  """What `pip install -e REPO` would install here: {name: version}, kdjax itself left out.

  `--dry-run --report` resolves and reports without installing. No `--no-deps` (the
  dependencies are the point), no `--ignore-installed` and no `--upgrade`: pip's default
  upgrade strategy keeps any installed distribution that satisfies kdjax's requirement, as a
  user's plain `pip install -e .` does."""
  report = tmp_path / 'pip-report.json'
  done = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--dry-run', '--quiet', '--no-input',
       '--disable-pip-version-check', '--report', str(report), '-e', REPO],
      capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, f'pip could not resolve kdjax (needs the registry):\n{done.stderr}'
  installs = json.loads(report.read_text())['install']
  return {canonicalize_name(item['metadata']['name']): item['metadata']['version']
          for item in installs if canonicalize_name(item['metadata']['name']) != 'kdjax'}


def test_installing_kdjax_beside_the_installed_jax_installs_no_other_jax(tmp_path):
  would_install = resolve_kdjax(tmp_path)
  installed = {name: metadata.version(name) for name in JAX}
  assert not set(JAX) & set(would_install), (
      f'pip install -e . would replace {installed} with '
      f'{ {name: would_install[name] for name in JAX if name in would_install} }')
  replaced = {}
  for name, version in would_install.items():
    try:
      replaced[name] = (metadata.version(name), version)
    except metadata.PackageNotFoundError:
      pass  # a missing dependency being added replaces nothing.
  assert replaced == {}, f'pip install -e . would replace installed distributions: {replaced}'
