"""deploy/ is checked offline the way its engines would check it, and each check is shown to fail.

* Dockerfile: parsed with dockerfile-parse (base image, non-root numeric user, exec-form entry
  point, no credentials, every COPY source present and inside the build context .dockerignore leaves).
* requirements.lock: every runtime dependency of pyproject.toml pinned, at a version it accepts.
* AWS Batch: each JSON file against botocore's own ``batch`` service model (ParamValidator, plus the
  enums it does not check), then what the retry rules do with each exit code, under the evaluation
  AWS documents.
* Kubernetes: each object against the published schema of Kubernetes 1.33 (backoffLimitPerIndex GA)
  and of the newest version kubernetes-validate ships, strict (unknown fields fail); then the
  cross-field rules only the API server enforces, and what podFailurePolicy does with each exit code.

Each check has a test that feeds it a deliberately broken copy and expects the report.
"""

from __future__ import annotations

import copy
import io
import json
import posixpath
import re
import tomllib
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import botocore.session
import kubernetes_validate
import pytest
import yaml
from botocore.model import ListShape, MapShape, Shape, StructureShape
from botocore.validate import ParamValidator
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from batch_upscaler.cli import build_parser
from batch_upscaler.manifest import parse_duration
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
BATCH = DEPLOY / "aws-batch"
K8S = DEPLOY / "kubernetes"
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
IMAGE_USER = 10001
# Both engines send SIGTERM, then SIGKILL 30 s later, by default: AWS Batch
# (https://docs.aws.amazon.com/batch/latest/userguide/job_timeouts.html; ECS StopTask likewise) and
# Kubernetes' terminationGracePeriodSeconds (https://kubernetes.io/docs/concepts/workloads/pods/pod-termination/).
ENGINE_STOP_TIMEOUT_S = 30.0
# backoffLimitPerIndex and maxFailedIndexes are GA from 1.33; also the newest schema the package has.
K8S_VERSIONS = ("1.33.0", kubernetes_validate.utils.latest_version())
SHARDING_FLAGS_WITH_VALUE = ("--shard-count", "--shard-index")  # issue 12, landing in parallel
SHARDING_FLAGS = ("--merge",)


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the broken copy needs exactly one {old!r} to replace"
    return text.replace(old, new)


# ---------------------------------------------------------------------------------------------
# Dockerfile and build context


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception '!', pattern) per line, as Docker reads .dockerignore (moby/patternmatcher)."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
        rules.append((negate, re.compile(_glob_regex(pattern))))
    return rules


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out.append("[^" + re.escape(body[1:]) + "]" if body[:1] in ("!", "^") else "[" + re.escape(body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether Docker leaves ``path`` out of the context: the last rule matching it or a parent wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


def _instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [str(item["value"]) for item in parser.structure if item["instruction"] == name]


def _exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed) else None


def dockerfile_problems(text: str, dockerignore: str, repo: Path = REPO) -> list[str]:
    parser = DockerfileParser(fileobj=io.StringIO(text))
    problems = []
    froms = _instructions(parser, "FROM")
    base = re.fullmatch(r"python:3\.(\d+)(?:\.\d+)?-slim(?:-[a-z]+)?(?:@sha256:[0-9a-f]{64})?", parser.baseimage or "")
    if len(froms) != 1 or base is None or int(base.group(1)) < 11:
        problems.append(f"base image must be a single python:3.11+-slim stage, got {froms}")
    users = _instructions(parser, "USER")
    uid = users[-1].split(":")[0] if users else ""
    if not uid.isdigit() or int(uid) != IMAGE_USER:
        problems.append(f"USER must be the numeric non-root {IMAGE_USER} (runAsNonRoot checks it), got {users}")
    entrypoints = _instructions(parser, "ENTRYPOINT")
    if not entrypoints or _exec_form(entrypoints[-1]) != ["batch-upscaler"]:
        problems.append(f'ENTRYPOINT must be exactly ["batch-upscaler"] (exec form: signals reach it), '
                        f"got {entrypoints}")
    cmds = _instructions(parser, "CMD")
    if not cmds or _exec_form(cmds[-1]) != ["--help"]:
        problems.append(f'CMD must be ["--help"], got {cmds}')
    if _instructions(parser, "STOPSIGNAL") != ["SIGTERM"]:
        problems.append(f"STOPSIGNAL must be SIGTERM, got {_instructions(parser, 'STOPSIGNAL')}")
    workdirs = _instructions(parser, "WORKDIR")
    if not workdirs or workdirs[-1] != "/work":
        problems.append(f"the last WORKDIR must be /work, got {workdirs}")
    for item in parser.structure:
        if item["instruction"] in ("ENV", "ARG"):
            problems += [f"{item['instruction']} names {name}: credentials come from the job's role, never the image"
                         for name in SECRET_NAMES if name in str(item["value"])]
    if _instructions(parser, "ADD"):
        problems.append("use COPY, not ADD (no remote sources, no archive unpacking)")
    rules = dockerignore_rules(dockerignore)
    for value in _instructions(parser, "COPY"):
        sources = [s for s in value.split()[:-1] if not s.startswith("--")]
        for source in sources:
            path = repo / source
            if not path.exists():
                problems.append(f"COPY source {source} does not exist in the repository")
                continue
            files = ([p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                     if path.is_dir() else [path])
            left_out = [str(p.relative_to(repo)) for p in files if ignored(rules, str(p.relative_to(repo)))]
            if left_out:
                problems.append(f"COPY source {source} is left out of the build context by .dockerignore: "
                                f"{left_out[:3]}")
    runs = " ".join(_instructions(parser, "RUN"))
    if not re.search(r"pip install [^&;]*(?:-r|-c|--requirement|--constraint)\s+\S*requirements\.lock", runs):
        problems.append("dependencies must be installed from deploy/requirements.lock (-r or -c)")
    if not re.search(r"pip install [^&;]*--no-deps[^&;]* \.(?:\s|$)", runs):
        problems.append("the package itself must be installed with --no-deps (only the lock's versions)")
    return problems


def _dockerfile_text() -> str:
    return (DEPLOY / "Dockerfile").read_text(encoding="utf-8")


def _dockerignore_text() -> str:
    return (REPO / ".dockerignore").read_text(encoding="utf-8")


def test_dockerfile_is_what_the_engines_need() -> None:
    assert dockerfile_problems(_dockerfile_text(), _dockerignore_text()) == []


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("FROM python:3.11-slim-bookworm", "FROM python:3.10-slim-bookworm", "base image"),
    ("FROM python:3.11-slim-bookworm", "FROM python:3.11-alpine", "base image"),
    ("USER 10001:10001", "USER root", "USER must be"),
    ('ENTRYPOINT ["batch-upscaler"]', "ENTRYPOINT batch-upscaler", "ENTRYPOINT must be"),
    ('CMD ["--help"]', 'CMD ["run"]', "CMD must be"),
    ("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGINT", "STOPSIGNAL"),
    ("ENV PYTHONDONTWRITEBYTECODE=1", "ARG AWS_SECRET_ACCESS_KEY\nENV PYTHONDONTWRITEBYTECODE=1",
     "ARG names AWS_SECRET"),
    ("    HOME=/work", "    HOME=/work AWS_ACCESS_KEY_ID=AKIAEXAMPLE", "ENV names AWS_ACCESS_KEY_ID"),
    ("COPY pyproject.toml README.md ./", "COPY pyproject.toml README.md setup.cfg ./", "setup.cfg does not exist"),
    ("RUN pip install --no-cache-dir -r deploy/requirements.lock", "RUN pip install --no-cache-dir boto3",
     "requirements.lock"),
    ("--no-deps .", ".", "--no-deps"),
])
def test_dockerfile_check_reports_each_mistake(old: str, new: str, expected: str) -> None:
    problems = dockerfile_problems(_replace_once(_dockerfile_text(), old, new), _dockerignore_text())
    assert any(expected in p for p in problems), problems


def test_build_context_holds_the_copied_files_and_nothing_local() -> None:
    rules = dockerignore_rules(_dockerignore_text())
    for kept in ("pyproject.toml", "README.md", "batch_upscaler/cli.py", "batch_upscaler/emulator/__init__.py",
                 "deploy/requirements.lock"):
        assert not ignored(rules, kept), kept
    for left_out in (".venv/bin/python", ".git/HEAD", ".batch-upscaler/demo.sqlite", "bench/out/run.json",
                     "tests/test_deploy.py", "demo-output/a.png", "batch_upscaler/__pycache__/cli.cpython-311.pyc",
                     "manifests/demo.yaml", "deploy/kubernetes/configmap.yaml"):
        assert ignored(rules, left_out), left_out
    # the check fails when the context loses a file the Dockerfile copies
    broken = _replace_once(_dockerignore_text(), "!README.md\n", "")
    assert any("README.md is left out" in p for p in dockerfile_problems(_dockerfile_text(), broken))


# ---------------------------------------------------------------------------------------------
# requirements.lock


def _runtime_requirements(pyproject_text: str) -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads(pyproject_text)["project"]["dependencies"]]


def lock_pins(lock_text: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in lock_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and ";" not in version, f"not an exact pin: {raw!r}"
            pins[str(canonicalize_name(name))] = version.strip()
    return pins


def lock_problems(pyproject_text: str, lock_text: str) -> list[str]:
    pins = lock_pins(lock_text)
    problems = []
    for req in _runtime_requirements(pyproject_text):
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"lock pins {req.name}=={version}, pyproject.toml asks for {req}")
    return problems


def test_lock_pins_every_runtime_dependency_as_pyproject_asks() -> None:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    lock = (DEPLOY / "requirements.lock").read_text(encoding="utf-8")
    assert lock_problems(pyproject, lock) == []
    pins = lock_pins(lock)
    exact = {str(canonicalize_name(r.name)): str(r.specifier).removeprefix("==")
             for r in _runtime_requirements(pyproject) if str(r.specifier).startswith("==")}
    assert set(exact) == {"aiobotocore", "botocore", "boto3"}
    assert {name: pins[name] for name in exact} == exact
    assert "batch-upscaler" not in pins  # the package itself is installed from the copied source
    # the check fails when the lock drifts from pyproject.toml's exact pins
    drifted = _replace_once(lock, f"botocore=={exact['botocore']}\n", "botocore==1.43.100\n")
    assert lock_problems(pyproject, drifted) == [f"lock pins botocore==1.43.100, pyproject.toml asks for "
                                                 f"botocore=={exact['botocore']}"]


# ---------------------------------------------------------------------------------------------
# AWS Batch


@pytest.fixture(scope="module")
def batch_model() -> Any:
    return botocore.session.get_session().get_service_model("batch")


def _enum_problems(value: Any, shape: Shape, path: str) -> Iterable[str]:
    """ParamValidator checks names and types, not enums: walk the value along the shape for those."""
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        for key, item in value.items():
            if key in shape.members:
                yield from _enum_problems(item, shape.members[key], f"{path}.{key}" if path else key)
    elif isinstance(shape, ListShape) and isinstance(value, list):
        for i, item in enumerate(value):
            yield from _enum_problems(item, shape.member, f"{path}[{i}]")
    elif isinstance(shape, MapShape) and isinstance(value, dict):
        for key, item in value.items():
            yield from _enum_problems(item, shape.value, f"{path}.{key}")
    elif getattr(shape, "enum", None) and isinstance(value, str) and value not in shape.enum:
        yield f"Invalid value for parameter {path}: {value!r}, valid values: {', '.join(shape.enum)}"


def batch_problems(model: Any, operation: str, params: dict[str, Any]) -> list[str]:
    input_shape = model.operation_model(operation).input_shape
    report = ParamValidator().validate(params, input_shape)
    problems = report.generate_report().splitlines() if report.has_errors() else []
    return problems + list(_enum_problems(params, input_shape, ""))


def _load_json(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


BATCH_FILES = [("job-definition.json", "RegisterJobDefinition"), ("submit-array-job.json", "SubmitJob"),
               ("submit-merge-job.json", "SubmitJob")]


@pytest.mark.parametrize(("name", "operation"), BATCH_FILES)
def test_batch_file_is_a_valid_request_for_botocore(batch_model: Any, name: str, operation: str) -> None:
    problems = batch_problems(batch_model, operation, _load_json(BATCH / name))
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: d["retryStrategy"].update(evaluateOnExits=d["retryStrategy"].pop("evaluateOnExit")),
     'Unknown parameter in retryStrategy: "evaluateOnExits"'),
    (lambda d: d["containerProperties"]["resourceRequirements"][0].update(value=1),
     "Invalid type for parameter containerProperties.resourceRequirements[0].value"),
    (lambda d: d["retryStrategy"]["evaluateOnExit"][0].update(action="RETRYY"),
     "Invalid value for parameter retryStrategy.evaluateOnExit[0].action: 'RETRYY'"),
    (lambda d: d.update(platformCapabilities=["LAMBDA"]), "Invalid value for parameter platformCapabilities[0]"),
    (lambda d: d.pop("type"), "Missing required parameter in input: \"type\""),
])
def test_batch_validation_reports_a_broken_copy(batch_model: Any, mutate: Any, expected: str) -> None:
    broken = copy.deepcopy(_load_json(BATCH / "job-definition.json"))
    mutate(broken)
    problems = batch_problems(batch_model, "RegisterJobDefinition", broken)
    assert any(expected in p for p in problems), problems


def batch_action(rules: list[dict[str, str]], *, exit_code: int | None, status_reason: str = "",
                 reason: str = "") -> str:
    """What AWS Batch does with a failed attempt (API_EvaluateOnExit, job_retries.html): the first rule
    whose every condition matches decides; when none matches, the job is retried. A rule on the exit
    code cannot match an attempt that has none (the host went away)."""
    for rule in rules:
        conditions = []
        if "onExitCode" in rule:
            conditions.append(exit_code is not None and fnmatchcase(str(exit_code), rule["onExitCode"]))
        if "onStatusReason" in rule:
            conditions.append(fnmatchcase(status_reason, rule["onStatusReason"]))
        if "onReason" in rule:
            conditions.append(fnmatchcase(reason, rule["onReason"]))
        if conditions and all(conditions):
            return rule["action"].upper()
    return "RETRY"


def retry_strategy_problems(strategy: dict[str, Any]) -> list[str]:
    """The documented limits botocore's model leaves to the service, and the glob syntax."""
    rules = strategy.get("evaluateOnExit", [])
    problems = []
    if not 1 <= strategy.get("attempts", 0) <= 10:
        problems.append(f"attempts must be 1-10, got {strategy.get('attempts')}")
    if len(rules) > 5:
        problems.append(f"evaluateOnExit takes at most 5 rules, got {len(rules)}")
    for i, rule in enumerate(rules):
        if not re.fullmatch(r"[0-9]*\*?", rule.get("onExitCode", "")) or len(rule.get("onExitCode", "")) > 512:
            problems.append(f"rule {i}: onExitCode may hold only digits and a final '*': {rule['onExitCode']!r}")
        for key in ("onStatusReason", "onReason"):
            if not re.fullmatch(r"[A-Za-z0-9.: \t]*\*?", rule.get(key, "")) or len(rule.get(key, "")) > 512:
                problems.append(f"rule {i}: {key} may hold letters, digits, '.', ':', blanks and a final '*'")
    return problems


def test_batch_retries_what_resumes_and_stops_on_what_cannot_succeed() -> None:
    strategy = _load_json(BATCH / "job-definition.json")["retryStrategy"]
    assert retry_strategy_problems(strategy) == []
    assert strategy["attempts"] == 5
    rules = strategy["evaluateOnExit"]
    for code in (75, 70, 137):  # resumable stop, a bug (checkpoint consistent), SIGKILL after the grace
        assert batch_action(rules, exit_code=code) == "RETRY", code
    for code in (1, 2, 3, 4, 5, 255):
        assert batch_action(rules, exit_code=code) == "EXIT", code
    assert batch_action(rules, exit_code=None, status_reason="Host EC2 (instance i-0abc123) terminated.") == "RETRY"
    assert batch_action(rules, exit_code=143, status_reason="Host EC2 (instance i-0abc123) terminated.") == "RETRY"
    assert batch_action(rules, exit_code=None, reason="CannotPullContainerError: pull access denied") == "RETRY"
    # the checks fail on a strategy that breaks the documented limits or would not retry 75
    broken = {"attempts": 11, "evaluateOnExit": [{"onExitCode": "7[05]", "action": "RETRY"}, *rules]}
    problems = retry_strategy_problems(broken)
    assert any("attempts must be" in p for p in problems) and any("at most 5" in p for p in problems)
    assert any("onExitCode may hold only digits" in p for p in problems), problems
    assert batch_action([{"onExitCode": "*", "action": "EXIT"}, *rules], exit_code=75) == "EXIT"


def _engine_args_problems(args: list[str]) -> list[str]:
    """The arguments parse with the real command line; the sharding flags of issue 12 are allowed
    whether or not they have landed in it yet."""
    _, unknown = build_parser().parse_known_args(args)
    leftover, i = [], 0
    while i < len(unknown):
        if unknown[i] in SHARDING_FLAGS_WITH_VALUE and i + 1 < len(unknown):
            i += 2
            continue
        if unknown[i] not in SHARDING_FLAGS:
            leftover.append(unknown[i])
        i += 1
    return [f"unknown arguments {leftover}"] if leftover else []


def _flag(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} once in {args}"
    return args[args.index(flag) + 1]


def _substitute(command: list[str], parameters: dict[str, str]) -> list[str]:
    missing = [c for c in command if c.startswith("Ref::") and c[5:] not in parameters]
    assert not missing, f"no parameter for {missing}"
    return [parameters[c[5:]] if c.startswith("Ref::") else c for c in command]


def test_batch_array_job_runs_one_shard_per_index_and_the_merge_waits_for_all() -> None:
    definition = _load_json(BATCH / "job-definition.json")
    array = _load_json(BATCH / "submit-array-job.json")
    merge = _load_json(BATCH / "submit-merge-job.json")
    container = definition["containerProperties"]
    args = _substitute(container["command"], definition["parameters"] | array.get("parameters", {}))
    assert args[:2] == ["run", "/config/archive.yaml"]
    assert _engine_args_problems(args) == []
    size = array["arrayProperties"]["size"]
    assert 2 <= size <= 10_000 and int(_flag(args, "--shard-count")) == size
    assert "--shard-index" not in args  # each child takes AWS_BATCH_JOB_ARRAY_INDEX
    assert parse_duration(_flag(args, "--grace")) < ENGINE_STOP_TIMEOUT_S
    assert definition["platformCapabilities"] == ["FARGATE"] and array["jobDefinition"] == merge["jobDefinition"]
    assert {r["type"]: r["value"] for r in container["resourceRequirements"]} == {"VCPU": "1", "MEMORY": "2048"}
    assert not {e["name"] for e in container.get("environment", [])} & set(SECRET_NAMES)
    mounts = {m["containerPath"]: m for m in container["mountPoints"]}
    assert mounts["/config"]["readOnly"] and not mounts["/state"]["readOnly"]
    assert {m["sourceVolume"] for m in mounts.values()} <= {v["name"] for v in container["volumes"]}
    # the merge: one job after the whole array (a type N_TO_N would pair it index by index)
    assert merge["dependsOn"] == [{"jobId": "<array-job-id>"}] and "arrayProperties" not in merge
    merge_args = merge["containerOverrides"]["command"]
    assert merge_args[:3] == ["report", args[1], "--merge"] and _engine_args_problems(merge_args) == []
    assert retry_strategy_problems(merge["retryStrategy"]) == []
    assert batch_action(merge["retryStrategy"]["evaluateOnExit"], exit_code=75) == "EXIT"
    # the argument check fails on a flag the command line does not have
    assert _engine_args_problems([*args, "--shards", "32"]) == ["unknown arguments ['--shards', '32']"]


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _k8s_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if d]


K8S_FILES = sorted(p.name for p in K8S.glob("*.yaml"))


def k8s_schema_problems(doc: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"]
    return []


def test_kubernetes_folder_holds_the_expected_objects() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for name in K8S_FILES for d in _k8s_docs(name))
    assert kinds == [("ConfigMap", "batch-upscaler-archive"), ("CronJob", "batch-upscaler-nightly"),
                     ("Job", "batch-upscaler-archive"), ("Job", "batch-upscaler-archive-merge"),
                     ("PersistentVolumeClaim", "batch-upscaler-state"), ("ServiceAccount", "batch-upscaler")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", K8S_FILES)
def test_kubernetes_object_validates_strictly(name: str, version: str) -> None:
    for doc in _k8s_docs(name):
        assert k8s_schema_problems(doc, version) == [], name


@pytest.mark.parametrize(("path", "key", "value", "expected"), [
    (("spec",), "completionMod", "Indexed", "'completionMod' was unexpected"),
    (("spec", "template", "spec", "containers", 0, "securityContext"), "readOnlyRootFilesystm", True,
     "'readOnlyRootFilesystm' was unexpected"),
    (("spec",), "backoffLimitPerIndex", "3", "'3' is not of type 'integer'"),
])
def test_kubernetes_validation_reports_a_broken_copy(path: tuple[str | int, ...], key: str, value: Any,
                                                     expected: str) -> None:
    broken = copy.deepcopy(_k8s_docs("indexed-job.yaml")[0])
    node: Any = broken
    for step in path:
        node = node[step]
    node[key] = value
    problems = k8s_schema_problems(broken, K8S_VERSIONS[-1])
    assert any(expected in p for p in problems), problems


def pod_failure_action(policy: dict[str, Any], *, exit_code: int, conditions: Iterable[str] = ()) -> str:
    """What the Job controller does with a failed pod: the first matching rule's action, else Count."""
    for rule in policy["rules"]:
        on_codes = rule.get("onExitCodes")
        if on_codes is not None:
            inside = exit_code in on_codes["values"]
            if inside if on_codes["operator"] == "In" else (not inside and exit_code != 0):
                return str(rule["action"])
        if any(p["type"] in conditions and p.get("status", "True") == "True" for p in rule.get("onPodConditions", [])):
            return str(rule["action"])
    return "Count"


def job_api_problems(spec: dict[str, Any]) -> list[str]:
    """Cross-field rules the API server enforces and a schema cannot express (Job API validation)."""
    pod = spec["template"]["spec"]
    problems = []
    policy = spec.get("podFailurePolicy")
    indexed = spec.get("completionMode") == "Indexed"
    if policy is not None:
        if pod.get("restartPolicy") != "Never":
            problems.append("podFailurePolicy needs restartPolicy: Never")
        if spec.get("podReplacementPolicy", "Failed") != "Failed":
            problems.append("podFailurePolicy needs podReplacementPolicy: Failed")
        for i, rule in enumerate(policy["rules"]):
            if rule["action"] not in ("FailJob", "FailIndex", "Ignore", "Count"):
                problems.append(f"rule {i}: unknown action {rule['action']}")
            if ("onExitCodes" in rule) == ("onPodConditions" in rule):
                problems.append(f"rule {i}: exactly one of onExitCodes and onPodConditions")
            if rule["action"] == "FailIndex" and "backoffLimitPerIndex" not in spec:
                problems.append(f"rule {i}: FailIndex needs backoffLimitPerIndex")
            values = rule.get("onExitCodes", {}).get("values", [])
            if values != sorted(set(values)) or (0 in values and rule["onExitCodes"]["operator"] == "In"):
                problems.append(f"rule {i}: exit codes must be ascending, unique, and not 0 with In: {values}")
    if ("backoffLimitPerIndex" in spec or "maxFailedIndexes" in spec) and not indexed:
        problems.append("backoffLimitPerIndex and maxFailedIndexes need completionMode: Indexed")
    if "maxFailedIndexes" in spec and not ("backoffLimitPerIndex" in spec
                                           and spec["maxFailedIndexes"] <= spec.get("completions", 0)):
        problems.append("maxFailedIndexes needs backoffLimitPerIndex and must not exceed completions")
    if indexed and not 1 <= spec.get("parallelism", 1) <= spec["completions"]:
        problems.append("parallelism must be between 1 and completions")
    return problems


def _container(spec: dict[str, Any]) -> dict[str, Any]:
    containers = spec["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _pod_problems(spec: dict[str, Any]) -> list[str]:
    """The pod each Job runs: its volumes, its user, and the objects of the other files it names."""
    pod = spec["template"]["spec"]
    container = _container(spec)
    problems = []
    configmap = _k8s_docs("configmap.yaml")[0]
    manifest = yaml.safe_load(configmap["data"]["archive.yaml"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    if not {m["name"] for m in mounts.values()} <= set(volumes):
        problems.append("a volumeMount names no volume")
    config_mount = mounts.get(posixpath.dirname(container["args"][1]))
    if (config_mount is None or not config_mount.get("readOnly")
            or volumes[config_mount["name"]].get("configMap", {}).get("name") != configmap["metadata"]["name"]
            or posixpath.basename(container["args"][1]) not in configmap["data"]):
        problems.append(f"{container['args'][1]} is not the manifest of configmap.yaml, mounted read-only")
    state_mount = mounts.get(manifest["state_dir"])
    claim = _k8s_docs("state-pvc.yaml")[0]["metadata"]["name"]
    if state_mount is None or volumes[state_mount["name"]].get("persistentVolumeClaim", {}).get("claimName") != claim:
        problems.append(f"state_dir {manifest['state_dir']} is not the claim {claim}")
    if not str(manifest.get("report_dir", "")).startswith("s3://"):
        problems.append("report_dir must be in S3, where the merge finds every shard's report")
    if "/tmp" not in mounts or "emptyDir" not in volumes[mounts["/tmp"]["name"]]:
        problems.append("a read-only root filesystem needs an emptyDir at /tmp")
    security = pod.get("securityContext", {}) | container.get("securityContext", {})
    if not (security.get("runAsNonRoot") and security.get("runAsUser") == IMAGE_USER
            and security.get("readOnlyRootFilesystem") and security.get("allowPrivilegeEscalation") is False):
        problems.append(f"the pod must run as the image's user {IMAGE_USER}, non-root, with a read-only root")
    if pod.get("serviceAccountName") != _k8s_docs("serviceaccount.yaml")[0]["metadata"]["name"]:
        problems.append("serviceAccountName must be the service account of serviceaccount.yaml (IRSA/Pod Identity)")
    if {e["name"] for e in container.get("env", [])} & set(SECRET_NAMES) or "envFrom" in container:
        problems.append("no credentials in the environment")
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    if not (limits == requests == {"cpu": "1", "memory": "2Gi"}):
        problems.append(f"resources must be 1 CPU and 2Gi, got {container['resources']}")
    grace = parse_duration(_flag(container["args"], "--grace")) if "--grace" in container["args"] else 0.0
    if grace >= pod.get("terminationGracePeriodSeconds", ENGINE_STOP_TIMEOUT_S):
        problems.append("--grace must end before terminationGracePeriodSeconds")
    return problems + _engine_args_problems(container["args"])


def test_indexed_job_runs_one_shard_per_index_and_retries_only_what_resumes() -> None:
    job = _k8s_docs("indexed-job.yaml")[0]
    spec = job["spec"]
    args = _container(spec)["args"]
    assert job_api_problems(spec) == [] and _pod_problems(spec) == []
    assert args[:2] == ["run", "/config/archive.yaml"] and "--max-duration" not in args
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 32 == int(_flag(args, "--shard-count"))
    assert "--shard-index" not in args  # each pod takes JOB_COMPLETION_INDEX
    assert spec["template"]["spec"]["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] == 3
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == ENGINE_STOP_TIMEOUT_S
    policy = spec["podFailurePolicy"]
    for code in (1, 2, 3, 4):
        assert pod_failure_action(policy, exit_code=code) == "FailIndex", code
    for code in (70, 75, 137):
        assert pod_failure_action(policy, exit_code=code) == "Count", code
    for code in (75, 137, 143):  # evicted, preempted, drained: retried without counting
        assert pod_failure_action(policy, exit_code=code, conditions={"DisruptionTarget"}) == "Ignore"


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda s: s["template"]["spec"].update(restartPolicy="OnFailure"), "restartPolicy: Never"),
    (lambda s: s.pop("backoffLimitPerIndex"), "FailIndex needs backoffLimitPerIndex"),
    (lambda s: s.update(maxFailedIndexes=33), "must not exceed completions"),
    (lambda s: s["podFailurePolicy"]["rules"][1]["onExitCodes"].update(values=[3, 2, 1]), "ascending"),
    (lambda s: s["podFailurePolicy"]["rules"][1].update(action="Retry"), "unknown action Retry"),
    (lambda s: s.update(completionMode="NonIndexed"), "need completionMode: Indexed"),
    (lambda s: _container(s).update(args=["run", "/config/archive.yaml", "--grace", "45s"]), "--grace must end"),
    (lambda s: _container(s)["securityContext"].update(readOnlyRootFilesystem=False), "read-only root"),
    (lambda s: s["template"]["spec"]["volumes"][1]["persistentVolumeClaim"].update(claimName="other"), "state_dir"),
    (lambda s: s["template"]["spec"]["volumes"][0]["configMap"].update(name="other"), "is not the manifest"),
    (lambda s: _container(s)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}), "no credentials"),
])
def test_job_checks_report_a_broken_copy(mutate: Any, expected: str) -> None:
    spec = copy.deepcopy(_k8s_docs("indexed-job.yaml")[0]["spec"])
    mutate(spec)
    problems = job_api_problems(spec) + _pod_problems(spec)
    assert any(expected in p for p in problems), problems


def test_cronjob_is_the_same_shards_each_night_never_overlapping() -> None:
    cron = _k8s_docs("cronjob.yaml")[0]["spec"]
    spec = cron["jobTemplate"]["spec"]
    indexed = _k8s_docs("indexed-job.yaml")[0]["spec"]
    args = _container(spec)["args"]
    assert job_api_problems(spec) == [] and _pod_problems(spec) == []
    assert cron["concurrencyPolicy"] == "Forbid" and cron["schedule"] == "0 1 * * *" and cron["timeZone"]
    assert 0 < cron["startingDeadlineSeconds"] <= 6 * 3600
    assert args == [*_container(indexed)["args"], "--max-duration", "6h"]
    night = parse_duration(_flag(args, "--max-duration")) + parse_duration(_flag(args, "--grace"))
    assert night < spec["activeDeadlineSeconds"] < 24 * 3600
    # the same pods as the one-off run, only the deadline added
    pod, indexed_pod = copy.deepcopy(spec["template"]), copy.deepcopy(indexed["template"])
    _container({"template": pod})["args"] = _container({"template": indexed_pod})["args"]
    assert pod == indexed_pod
    same = ("completionMode", "completions", "parallelism", "backoffLimitPerIndex", "maxFailedIndexes")
    assert {k: spec[k] for k in same} == {k: indexed[k] for k in same}
    # a night's end (75, mostly --max-duration) waits for the next night; evictions are retried
    policy = spec["podFailurePolicy"]
    assert [pod_failure_action(policy, exit_code=c) for c in (1, 2, 3, 4, 75)] == ["FailIndex"] * 5
    assert [pod_failure_action(policy, exit_code=c) for c in (70, 137)] == ["Count"] * 2
    assert pod_failure_action(policy, exit_code=75, conditions={"DisruptionTarget"}) == "Ignore"


def test_merge_job_reads_the_same_manifest_and_never_retries_an_answer() -> None:
    spec = _k8s_docs("merge-job.yaml")[0]["spec"]
    args = _container(spec)["args"]
    assert job_api_problems(spec) == [] and _pod_problems(spec) == []
    assert args[:3] == ["report", _container(_k8s_docs("indexed-job.yaml")[0]["spec"])["args"][1], "--merge"]
    assert "completionMode" not in spec and "--shard-count" not in args
    for code in (1, 2, 3, 4, 75):  # failures found, usage, credentials, lock, shards missing
        assert pod_failure_action(spec["podFailurePolicy"], exit_code=code) == "FailJob"
