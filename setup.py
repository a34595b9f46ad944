"""Build step: ship the top-level migrations/ and config.example.yaml inside the package.

Everything else is declared in pyproject.toml. The repository keeps both files at its top level
(where operators and reviewers look for them); the wheel carries them as
``appservice/migrations/*.sql`` and ``appservice/config.example.yaml``, which
``appservice.resources`` loads with importlib.resources. MANIFEST.in puts them in the sdist, so a
wheel built from the sdist gets them the same way.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            # An editable install imports the tree itself, where appservice.resources finds
            # the top-level files.
            return
        target = Path(self.build_lib) / "appservice"
        self.mkpath(str(target))
        self.copy_file(str(ROOT / "config.example.yaml"), str(target / "config.example.yaml"))
        self.mkpath(str(target / "migrations"))
        for sql in sorted((ROOT / "migrations").glob("*.sql")):
            self.copy_file(str(sql), str(target / "migrations" / sql.name))


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
