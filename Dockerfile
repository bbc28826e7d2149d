# CPU image that installs the same pins as `make setup` and runs the pipeline on the
# embedded default data. Build: docker build -t cnn-pipeline .   Run: docker run --rm cnn-pipeline
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt requirements-dev.txt constraints.txt ./
# The pinned torch 2.14.1 from PyPI is the CUDA build; it runs on the CPU as well.
RUN python -m pip install --no-cache-dir -r requirements.txt -c constraints.txt

COPY . .
# dvc repro needs a git repository; a fresh clone copied in without .git gets one here.
RUN git config --global user.email "docker@localhost" && git config --global user.name "docker" \
    && (test -d .git || (git init -q && git add -A && git commit -qm "image"))

ENV PYTHONUNBUFFERED=1
CMD ["dvc", "repro"]
