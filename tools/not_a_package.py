"""A PEP 517 build backend that refuses to build: this repository is a research tool run from its folder, not a
package. Without it, `pip install .` would build an empty wheel and report success, after which nothing imports.

pyproject.toml names it with `backend-path = ["tools"]`, so pip needs nothing from the network to get this message.
"""

MESSAGE = (
    "knowledge-neurons-ssm is not an installable package (pip would build an empty wheel). Clone the repository "
    "and run it from there: `make run` (or `pip install -r requirements.txt`, then `python main.py`); the Python "
    "API imports from the repository folder. See README.md."
)


def _refuse(*args, **kwargs):
    raise SystemExit(f"error: {MESSAGE}")


get_requires_for_build_wheel = get_requires_for_build_sdist = get_requires_for_build_editable = _refuse
prepare_metadata_for_build_wheel = prepare_metadata_for_build_editable = _refuse
build_wheel = build_sdist = build_editable = _refuse
