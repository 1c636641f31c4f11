"""FineTuneJob manifests, valid and invalid, shared by the offline validator tests and the kube-apiserver tests."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import yaml

ERROR_MARK = "# <- error"

MODEL = "model:\n  name: HuggingFaceTB/SmolLM2-135M-Instruct\n"
DATASET = "dataset:\n  train: s3://kubetune-data/ag_news/train.jsonl\n"
OUTPUT = "output:\n  uri: s3://kubetune-out/ag-news\n"
BASE_SPEC = MODEL + DATASET + OUTPUT


def job(spec: str, *, name: str = "bad-job", kind: str = "FineTuneJob", spec_mark: bool = False) -> str:
    """A FineTuneJob manifest with the given spec body; spec_mark marks the `spec:` line as the error line."""
    spec_line = f"spec:  {ERROR_MARK}" if spec_mark else "spec:"
    body = textwrap.indent(textwrap.dedent(spec).strip("\n") + "\n", "  ")
    return f"apiVersion: kubetune.io/v1alpha1\nkind: {kind}\nmetadata:\n  name: {name}\n{spec_line}\n{body}"


@dataclass(frozen=True)
class InvalidManifest:
    """A manifest with one defect: what `kubetune validate` and the API server must each say about it."""

    name: str
    text: str  # the line the offline validator must point at ends with ERROR_MARK
    field: str  # wire path named by `kubetune validate`
    message: str  # part of the offline message
    server_field: str  # field path named by the kube-apiserver
    server_message: str  # part of the kube-apiserver's message

    @property
    def error_line(self) -> int:
        """1-based line of the marked line."""
        lines = [number for number, line in enumerate(self.text.splitlines(), 1) if line.endswith(ERROR_MARK)]
        assert len(lines) == 1, f"{self.name}: mark exactly one line with {ERROR_MARK!r}"
        return lines[0]

    @property
    def data(self) -> dict[str, object]:
        """The manifest as a dict, as a client sends it."""
        loaded = yaml.safe_load(self.text)
        assert isinstance(loaded, dict)
        return loaded


INVALID_MANIFESTS: list[InvalidManifest] = [
    InvalidManifest(
        "bad-method-enum",
        job(BASE_SPEC + f"method: qlora4  {ERROR_MARK}"),
        "spec.method",
        "Input should be 'qlora', 'lora' or 'full'",
        "spec.method",
        'Unsupported value: "qlora4"',
    ),
    InvalidManifest(
        "learning-rate-above-one",
        job(BASE_SPEC + f"training:\n  learningRate: 5  {ERROR_MARK}"),
        "spec.training.learningRate",
        "less than or equal to 1",
        "spec.training.learningRate",
        "less than or equal to 1",
    ),
    InvalidManifest(
        "zero-epochs",
        job(BASE_SPEC + f"training:\n  epochs: 0  {ERROR_MARK}"),
        "spec.training.epochs",
        "greater than 0",
        "spec.training.epochs",
        "greater than 0",
    ),
    InvalidManifest(
        "batch-size-not-a-number",
        job(BASE_SPEC + f"training:\n  batchSize: eight  {ERROR_MARK}"),
        "spec.training.batchSize",
        "valid integer",
        "spec.training.batchSize",
        "must be of type integer",
    ),
    InvalidManifest(
        "bad-s3-uri",
        job(MODEL + OUTPUT + f"dataset:\n  train: s3://Bad_Bucket/train.jsonl  {ERROR_MARK}"),
        "spec.dataset.train",
        "should match pattern",
        "spec.dataset.train",
        "should match",
    ),
    InvalidManifest(
        "bad-memory-quantity",
        job(BASE_SPEC + f"resources:\n  memory: 32 GiB  {ERROR_MARK}"),
        "spec.resources.memory",
        "should match pattern",
        "spec.resources.memory",
        "should match",
    ),
    InvalidManifest(
        "too-many-gpus",
        job(BASE_SPEC + f"resources:\n  gpus: 65  {ERROR_MARK}"),
        "spec.resources.gpus",
        "less than or equal to 64",
        "spec.resources.gpus",
        "less than or equal to 64",
    ),
    InvalidManifest(
        "bad-toleration-effect",
        job(BASE_SPEC + f"resources:\n  tolerations:\n    - key: gpu\n      effect: Never  {ERROR_MARK}"),
        "spec.resources.tolerations[0].effect",
        "Input should be 'NoSchedule'",
        "spec.resources.tolerations[0].effect",
        'Unsupported value: "Never"',
    ),
    # The CRD's CEL rules: `kubetune validate` evaluates the same rules and names the same field as the API server.
    InvalidManifest(
        "model-name-and-uri",
        job(
            f"model:  {ERROR_MARK}\n  name: HuggingFaceTB/SmolLM2-135M-Instruct\n  uri: s3://kubetune-models/smollm2\n"
            + DATASET
            + OUTPUT
        ),
        "spec.model",
        "exactly one of model.name or model.uri must be set",
        "spec.model",
        "exactly one of model.name or model.uri must be set",
    ),
    InvalidManifest(
        "model-neither-name-nor-uri",
        job(f"model:  {ERROR_MARK}\n  revision: main\n" + DATASET + OUTPUT),
        "spec.model",
        "exactly one of model.name or model.uri must be set",
        "spec.model",
        "exactly one of model.name or model.uri must be set",
    ),
    InvalidManifest(
        "qlora-with-8-bits",
        job(BASE_SPEC + f"method: qlora\nquantization:\n  bits: 8  {ERROR_MARK}"),
        "spec.quantization.bits",
        "method qlora requires quantization.bits 4",
        "spec.quantization.bits",
        "method qlora requires quantization.bits 4",
    ),
    InvalidManifest(
        "quantization-with-lora",
        job(BASE_SPEC + f"method: lora\nquantization:  {ERROR_MARK}\n  bits: 4"),
        "spec.quantization",
        "quantization applies to method qlora only",
        "spec.quantization",
        "quantization applies to method qlora only",
    ),
    InvalidManifest(
        "full-with-lora-settings",
        job(BASE_SPEC + f"method: full\nlora:  {ERROR_MARK}\n  r: 8"),
        "spec.lora",
        "lora settings apply to methods lora and qlora only",
        "spec.lora",
        "lora settings apply to methods lora and qlora only",
    ),
    InvalidManifest(
        "lora-rank-zero",
        job(BASE_SPEC + f"lora:\n  r: 0  {ERROR_MARK}"),
        "spec.lora.r",
        "greater than or equal to 1",
        "spec.lora.r",
        "greater than or equal to 1",
    ),
    InvalidManifest(
        "validation-split-too-large",
        job(
            MODEL + OUTPUT + f"dataset:\n  train: s3://kubetune-data/train.jsonl\n  validationSplit: 0.7  {ERROR_MARK}"
        ),
        "spec.dataset.validationSplit",
        "less than 0.5",
        "spec.dataset.validationSplit",
        "less than 0.5",
    ),
    InvalidManifest(
        "validation-file-and-split",
        job(
            MODEL
            + OUTPUT
            + f"dataset:  {ERROR_MARK}\n  train: s3://kubetune-data/train.jsonl\n"
            + "  validation: s3://kubetune-data/test.jsonl\n  validationSplit: 0.1"
        ),
        "spec.dataset",
        "set dataset.validation or dataset.validationSplit, not both",
        "spec.dataset",
        "set dataset.validation or dataset.validationSplit, not both",
    ),
    InvalidManifest(
        "openai-backend-without-openai-block",
        job(BASE_SPEC + "backend: openai", spec_mark=True),  # spec.openai is missing: the spec is pointed at
        "spec.openai",
        "backend openai requires spec.openai",
        "spec.openai",
        "backend openai requires spec.openai",
    ),
    InvalidManifest(
        "gguf-of-a-classification-head",
        job(
            MODEL
            + DATASET
            + "training:\n  objective: sequence-classification\n"
            + f"output:\n  uri: s3://kubetune-out/ag-news\n  gguf:  {ERROR_MARK}\n    quantization: q8_0"
        ),
        "spec.output.gguf",
        "a sequence-classification head has no GGUF form",
        "spec.output.gguf",
        "a sequence-classification head has no GGUF form",
    ),
    InvalidManifest(
        "registry-export-on-openai-backend",
        job(
            "model:\n  name: gpt-4o-mini-2024-07-18\n"
            + "dataset:\n  train: s3://kubetune-data/chat.jsonl\n  format: messages\n"
            + f"output:  {ERROR_MARK}\n  uri: s3://kubetune-out/chat\n"
            + "  registry:\n    repository: registry.example.com/team/adapters\n"
            + "backend: openai\nopenai:\n  model: gpt-4o-mini-2024-07-18\n"
            + "  apiKeySecretRef: {name: openai, key: api-key}"
        ),
        "spec.output",
        "backend openai keeps the tuned weights with the provider",
        "spec.output",
        "backend openai keeps the tuned weights with the provider",
    ),
    InvalidManifest(
        "registry-repository-with-a-tag",
        job(
            MODEL
            + DATASET
            + "output:\n  uri: s3://kubetune-out/ag-news\n  registry:\n"
            + f"    repository: registry.example.com/team/adapters:v1  {ERROR_MARK}"
        ),
        "spec.output.registry.repository",
        "should match pattern",
        "spec.output.registry.repository",
        "should match",
    ),
    InvalidManifest(
        "gguf-quantization-unknown",
        job(
            MODEL
            + DATASET
            + f"output:\n  uri: s3://kubetune-out/ag-news\n  gguf:\n    quantization: q4_k_m  {ERROR_MARK}"
        ),
        "spec.output.gguf.quantization",
        "Input should be 'f16', 'bf16' or 'q8_0'",
        "spec.output.gguf.quantization",
        'Unsupported value: "q4_k_m"',
    ),
    InvalidManifest(
        "llama-cpp-serving-without-gguf",
        job(BASE_SPEC + f"serving:\n  runtime: llamaCpp  {ERROR_MARK}"),
        "spec.serving.runtime",
        "serving.runtime llamaCpp serves the GGUF export: set output.gguf",
        "spec.serving.runtime",
        "serving.runtime llamaCpp serves the GGUF export: set output.gguf",
    ),
    InvalidManifest(
        "vllm-serving-of-a-full-fine-tune",
        job(BASE_SPEC + f"method: full\nserving:\n  runtime: vllm  {ERROR_MARK}"),
        "spec.serving.runtime",
        "serving.runtime vllm loads the adapter on its base model",
        "spec.serving.runtime",
        "serving.runtime vllm loads the adapter on its base model",
    ),
    InvalidManifest(
        "serving-a-classification-head",
        job(BASE_SPEC + f"training:\n  objective: sequence-classification\nserving:  {ERROR_MARK}\n  runtime: vllm"),
        "spec.serving",
        "serving needs a generating model of backend local",
        "spec.serving",
        "serving needs a generating model of backend local",
    ),
    InvalidManifest(
        "judge-metric-without-judge",
        job(BASE_SPEC + f"evaluation:  {ERROR_MARK}\n  metrics: [accuracy, judge]"),
        "spec.evaluation",
        "evaluation.metrics has judge: set evaluation.judge",
        "spec.evaluation",
        "evaluation.metrics has judge: set evaluation.judge",
    ),
    InvalidManifest(
        "sequence-classification-with-messages",
        job(
            MODEL
            + OUTPUT
            + "dataset:\n  train: s3://kubetune-data/chat.jsonl\n  format: messages\n"
            + f"training:\n  objective: sequence-classification  {ERROR_MARK}"
        ),
        "spec.training.objective",
        "training.objective sequence-classification requires dataset.format classification",
        "spec.training.objective",
        "training.objective sequence-classification requires dataset.format classification",
    ),
    InvalidManifest(
        "packing-with-sequence-classification",
        job(BASE_SPEC + f"training:  {ERROR_MARK}\n  objective: sequence-classification\n  packing: true"),
        "spec.training",
        "training.packing applies to objective causal-lm only",
        "spec.training",
        "training.packing applies to objective causal-lm only",
    ),
    # A gate the evaluation can never meet is refused with the spec, not found out after training.
    InvalidManifest(
        "gate-on-an-unknown-score",
        job(BASE_SPEC + f"evaluation:\n  gate:\n    metric: acuracy  {ERROR_MARK}"),
        "spec.evaluation.gate.metric",
        "evaluation.gate.metric must name a metric or a score: loss, perplexity, accuracy",
        "spec.evaluation.gate.metric",
        "evaluation.gate.metric must name a metric or a score",
    ),
    InvalidManifest(
        "gate-on-a-metric-not-listed",
        job(BASE_SPEC + f"evaluation:\n  metrics: [loss, rougeL]\n  gate:\n    metric: accuracy  {ERROR_MARK}"),
        "spec.evaluation.gate.metric",
        "evaluation.gate.metric accuracy is not computed by evaluation.metrics: add accuracy to them",
        "spec.evaluation.gate.metric",
        "evaluation.gate.metric accuracy is not computed by evaluation.metrics: add accuracy to them",
    ),
    InvalidManifest(
        "gate-on-a-score-never-inferred-for-the-format",
        job(
            MODEL
            + OUTPUT
            + "dataset:\n  train: s3://kubetune-data/corpus.jsonl\n  format: text\n"
            + f"evaluation:\n  gate:\n    metric: macroF1  {ERROR_MARK}\n    threshold: 0.8"
        ),
        "spec.evaluation.gate.metric",
        "evaluation.gate.metric macroF1 is never inferred for dataset.format text",
        "spec.evaluation.gate.metric",
        "evaluation.gate.metric macroF1 is never inferred for dataset.format text",
    ),
    InvalidManifest(
        "gate-on-the-judge-without-the-judge-metric",
        job(BASE_SPEC + f"evaluation:\n  gate:\n    metric: judge  {ERROR_MARK}"),
        "spec.evaluation.gate.metric",
        "evaluation.gate.metric judge is never inferred for dataset.format auto",
        "spec.evaluation.gate.metric",
        "evaluation.gate.metric judge is never inferred for dataset.format auto",
    ),
    InvalidManifest(
        "gate-threshold-a-bounded-score-cannot-reach",
        job(BASE_SPEC + f"evaluation:\n  gate:\n    metric: accuracy\n    threshold: 85  {ERROR_MARK}"),
        "spec.evaluation.gate.threshold",
        "evaluation.gate.threshold is out of reach: accuracy ranges from 0 to 1",
        "spec.evaluation.gate.threshold",
        "evaluation.gate.threshold is out of reach: accuracy ranges from 0 to 1",
    ),
    InvalidManifest(
        "gate-must-beat-a-baseline-not-run",
        job(
            BASE_SPEC
            + "evaluation:\n  baselines: [zeroShot]\n  gate:\n    metric: accuracy\n"
            + f"    mustBeat: [fewShot]  {ERROR_MARK}"
        ),
        "spec.evaluation.gate.mustBeat",
        "evaluation.gate.mustBeat names a baseline or contender that the evaluation does not run",
        "spec.evaluation.gate.mustBeat",
        "evaluation.gate.mustBeat names a baseline or contender that the evaluation does not run",
    ),
    InvalidManifest(
        "contender-named-like-a-baseline",
        job(
            BASE_SPEC + f"evaluation:\n  contenders:  {ERROR_MARK}\n    - name: fewShot\n      model: gpt-4o-2024-08-06"
        ),
        "spec.evaluation.contenders",
        "evaluation.contenders[].name must not be tuned, zeroShot, fewShot or retrievalFewShot",
        "spec.evaluation.contenders",
        "evaluation.contenders[].name must not be tuned, zeroShot, fewShot or retrievalFewShot",
    ),
    InvalidManifest(
        "contenders-with-one-name",
        job(
            BASE_SPEC
            + f"evaluation:\n  contenders:  {ERROR_MARK}\n    - name: big\n      model: gpt-4o-2024-08-06\n"
            + "    - name: big\n      model: gpt-4o-mini-2024-07-18"
        ),
        "spec.evaluation.contenders",
        "evaluation.contenders[].name must be unique",
        "spec.evaluation.contenders",
        "evaluation.contenders[].name must be unique",
    ),
    InvalidManifest(
        "gate-with-evaluation-off",
        job(BASE_SPEC + f"evaluation:\n  enabled: false\n  gate:  {ERROR_MARK}\n    metric: loss"),
        "spec.evaluation.gate",
        "evaluation.gate needs evaluation.enabled: true",
        "spec.evaluation.gate",
        "evaluation.gate needs evaluation.enabled: true",
    ),
    InvalidManifest(
        "hosted-gate-on-loss",
        job(
            BASE_SPEC
            + "backend: openai\nopenai:\n  model: gpt-4o-mini-2024-07-18\n  apiKeySecretRef:\n"
            + "    name: openai\n    key: api-key\n"
            + f"evaluation:\n  metrics: [loss, accuracy]\n  gate:\n    metric: loss  {ERROR_MARK}"
        ),
        "spec.evaluation.gate.metric",
        "backend openai reports no loss for the hosted model",
        "spec.evaluation.gate.metric",
        "backend openai reports no loss for the hosted model",
    ),
    InvalidManifest(
        "hosted-loss-only",
        job(
            BASE_SPEC
            + "backend: openai\nopenai:\n  model: gpt-4o-mini-2024-07-18\n  apiKeySecretRef:\n"
            + f"    name: openai\n    key: api-key\nevaluation:\n  metrics: [loss]  {ERROR_MARK}"
        ),
        "spec.evaluation.metrics",
        "backend openai: loss needs the model's probabilities of the reference tokens",
        "spec.evaluation.metrics",
        "backend openai: loss needs the model's probabilities of the reference tokens",
    ),
    InvalidManifest(
        "image-reference-that-cannot-be-valid",
        job(BASE_SPEC + f"image: https://ghcr.io/kubetune/trainer:latest  {ERROR_MARK}"),
        "spec.image",
        "String should match pattern",
        "spec.image",
        "should match",
    ),
    InvalidManifest(
        "unknown-field",
        job(BASE_SPEC + f"training:\n  learningRat: 0.001  {ERROR_MARK}"),
        "spec.training.learningRat",
        "Extra inputs are not permitted",
        "spec.training.learningRat",
        "unknown field",
    ),
    InvalidManifest(
        "snake-case-field",
        job(BASE_SPEC + f"training:\n  learning_rate: 0.001  {ERROR_MARK}"),
        "spec.training.learning_rate",
        "Extra inputs are not permitted",
        "spec.training.learning_rate",
        "unknown field",
    ),
    InvalidManifest(
        "missing-output",
        job(MODEL + DATASET, spec_mark=True),
        "spec.output",
        "Field required",
        "spec.output",
        "Required value",
    ),
    InvalidManifest(
        "wrong-kind",
        job(BASE_SPEC).replace("kind: FineTuneJob", f"kind: FineTuneJobs  {ERROR_MARK}"),
        "kind",
        "only FineTuneJob is accepted",
        "kind",
        'Invalid value: "FineTuneJobs": must be FineTuneJob',
    ),
    InvalidManifest(
        "bad-name",
        job(BASE_SPEC, name=f"Bad_Name  {ERROR_MARK}"),
        "metadata.name",
        "should match pattern",
        "metadata.name",
        'Invalid value: "Bad_Name": a lowercase RFC 1123',
    ),
    InvalidManifest(
        "multi-node-name-too-long-for-its-trainer-pods",
        job(BASE_SPEC + "resources:\n  nodes: 2", name="a" * 40 + f"  {ERROR_MARK}"),
        "metadata.name",
        "at most 39 characters when resources.nodes > 1",
        "metadata.name",
        "at most 39 characters when resources.nodes > 1",
    ),
    InvalidManifest(
        "multi-node-hosted-job",
        job(
            BASE_SPEC
            + "backend: openai\nopenai:\n  model: gpt-4o-mini-2024-07-18\n  apiKeySecretRef: {name: openai, key: k}\n"
            + f"resources:\n  nodes: 2  {ERROR_MARK}"
        ),
        "spec.resources.nodes",
        "backend openai trains with the provider: resources.nodes must be 1",
        "spec.resources.nodes",
        "backend openai trains with the provider: resources.nodes must be 1",
    ),
    InvalidManifest(
        "too-many-nodes",
        job(BASE_SPEC + f"resources:\n  nodes: 33  {ERROR_MARK}"),
        "spec.resources.nodes",
        "less than or equal to 32",
        "spec.resources.nodes",
        "should be less than or equal to 32",
    ),
    InvalidManifest(
        "name-too-long-for-its-trainer-pods",
        job(BASE_SPEC, name="a" * 50 + f"  {ERROR_MARK}"),
        "metadata.name",
        "at most 49 characters (50 given): the trainer pods are named <name>-trainer-<5 characters>",
        "metadata.name",
        "Too long: may not be more than 49",
    ),
]

VALID_MANIFESTS: dict[str, str] = {
    "minimal": job(BASE_SPEC, name="minimal"),
    "everything": job(
        """
        model:
          uri: s3://kubetune-models/smollm2-135m
        dataset:
          train: s3://kubetune-data/banking77/train.jsonl
          validation: s3://kubetune-data/banking77/test.jsonl
          format: classification
          columns: {text: sentence, label: intent}
          labels: [card_arrival, card_linking]
          systemPrompt: Classify the banking intent.
          maxLength: 256
        method: qlora
        lora: {r: 8, alpha: 16, dropout: 0.1, targetModules: [q_proj, v_proj]}
        quantization: {bits: 4, type: nf4, doubleQuant: true, computeDtype: bfloat16}
        training:
          objective: causal-lm
          maxSteps: 100
          batchSize: 4
          gradientAccumulationSteps: 2
          learningRate: 3.0e-4
          scheduler: linear
          warmupSteps: 8
          checkpointEvery: 25
        evaluation:
          metrics: [accuracy, f1, judge]
          baselines: [zeroShot, fewShot, retrievalFewShot]
          fewShotK: 3
          maxSamples: 100
          judge:
            baseUrl: http://judge.kubetune.svc:8000/v1
            model: judge-model
            apiKeySecretRef: {name: judge-key, key: api-key}
            rubric: The answer names the right intent.
          contenders:
            - name: gpt-4o
              model: gpt-4o-2024-08-06
              apiKeySecretRef: {name: openai, key: api-key}
              prompting: retrievalFewShot
              pricePerMillionInputTokens: 2.5
              pricePerMillionOutputTokens: 10
            - name: local-llama
              baseUrl: http://llama.kubetune.svc:8080/v1
              model: llama-3-8b-instruct
              prompting: zeroShot
          gate: {metric: accuracy, threshold: 0.5, mustBeat: [zeroShot, fewShot, gpt-4o], failJob: true}
        output:
          uri: s3://kubetune-out/banking77
          mergeAdapter: true
          gguf: {quantization: q8_0}
          registry:
            repository: registry.example.com:5000/team/adapters
            tag: banking77-v1
            credentialsSecretRef: registry-push
        serving: {runtime: vllm, replicas: 2, gpus: 1, memory: 24Gi}
        resources:
          gpus: 2
          cpu: "4"
          memory: 32Gi
          nodeSelector: {kubetune.io/gpu: a100}
          tolerations:
            - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
          priorityClassName: training
        image: ghcr.io/kubetune/trainer:0.1.0
        s3: {endpoint: "http://minio.storage:9000", region: us-east-1, credentialsSecretRef: s3-credentials}
        queueName: gpu-queue
        runPolicy: {backoffLimit: 3, activeDeadlineSeconds: 7200, ttlSecondsAfterFinished: 600, suspend: false}
        """,
        name="everything",
    ),
    "openai-backend": job(
        """
        model:
          name: gpt-4o-mini-2024-07-18
        dataset:
          train: s3://kubetune-data/chat.jsonl
          format: messages
        output:
          uri: s3://kubetune-out/hosted
        backend: openai
        openai:
          model: gpt-4o-mini-2024-07-18
          apiKeySecretRef: {name: openai, key: api-key}
          suffix: ag-news
          hyperparameters: {nEpochs: 2}
        """,
        name="openai-backend",
    ),
}
