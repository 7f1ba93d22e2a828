rule train:
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
