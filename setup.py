"""Installs the vision-pipelines package; also what Dataflow workers install (--setup_file)."""

from setuptools import find_packages, setup

RUNTIME_REQUIREMENTS = [
    "apache-beam[gcp]==2.77.0",
    "tensorflow==2.21.*",
    "tensorflow-transform==1.21.*",
    "tfx-bsl==1.21.*",
    "tensorflow-metadata==1.21.*",
    "keras>=3.10,<4",
    "scann==1.4.2",
    "pyarrow>=16",
    "pillow>=10",
    "numpy>=1.26",
    "google-cloud-storage>=2.14",
    "google-cloud-bigquery>=3.20",
    "scikit-learn>=1.4",
    "duckdb>=1.1",
    "sqlglot>=25",  # Parses users' BigQuery SQL so the sql command runs only a SELECT
    "matplotlib>=3.8",
    "PyYAML>=6",
    "tensorboard>=2.20",  # TensorBoard logs during training (TF 2.21 no longer installs it)
    "fastapi==0.165.0",  # serve-search: the image search page and JSON API
    "uvicorn==0.54.0",
]

TEST_REQUIREMENTS = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "ruff>=0.6",
    "gcp-storage-emulator>=2024.8.3",
    "bqemulator==1.4.0",
    "selenium==4.32.0",  # Drives Debian's chromium in the serve-search page test
]

# benchmarks/index.py compares the ScaNN index with these; the jobs never import them.
BENCH_REQUIREMENTS = [
    "faiss-cpu==1.15.1",
    "hnswlib==0.8.0",
]

setup(
    name="vision-pipelines",
    version="0.1.0",
    description="Apache Beam jobs for computer-vision datasets, training, inference, embeddings and search.",
    python_requires=">=3.10,<3.12",
    packages=find_packages(include=["beam_jobs", "beam_jobs.*", "transforms", "transforms.*",
                                    "model_lib", "model_lib.*", "schemas", "schemas.*",
                                    "retrieval", "retrieval.*"]),
    package_data={"beam_jobs": ["help/*.txt"]},  # Each job's --help, printed without importing the job.
    install_requires=RUNTIME_REQUIREMENTS,
    extras_require={"test": TEST_REQUIREMENTS, "bench": BENCH_REQUIREMENTS},
    entry_points={"console_scripts": ["vision-pipelines=beam_jobs.cli:main"]},
)
