rule train:
    wildcard_constraints:
        arch=TRAINED_ARCH,
    input:
        inputs("train"),
    output:
        outputs("train"),
    params:
        cmd=cmd("train"),
    log:
        f"{ROOT}logs/train/{{dataset}}/{{arch}}/{{tm}}.log",
    benchmark:
        f"{ROOT}benchmarks/train/{{dataset}}/{{arch}}/{{tm}}.tsv"
    threads: THREADS.get("train", 2)
    resources:
        gpu=GPUS,
        runtime=RUNTIME.get("train", 1440),
        mem_mb=MEM_MB,
    shell:
        "export OMP_NUM_THREADS={threads}; {params.cmd} > {log} 2>&1"


rule import_dense:
    wildcard_constraints:
        arch=IMPORTED_ARCH,
    input:
        inputs("import"),
    output:
        outputs("import"),
    params:
        cmd=cmd("import"),
    log:
        f"{ROOT}logs/import/{{dataset}}/{{arch}}/{{tm}}.log",
    threads: 1
    resources:
        gpu=0,
        runtime=RUNTIME.get("data", 60),
        mem_mb=MEM_MB,
    shell:
        "export OMP_NUM_THREADS={threads}; {params.cmd} > {log} 2>&1"
