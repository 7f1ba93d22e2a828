rule mrs:
    input:
        inputs("mrs"),
    output:
        outputs("mrs"),
    params:
        cmd=cmd("mrs"),
    log:
        f"{ROOT}logs/mrs/{{dataset}}/{{arch}}/{{tm}}.log",
    benchmark:
        f"{ROOT}benchmarks/mrs/{{dataset}}/{{arch}}/{{tm}}.tsv"
    threads: THREADS.get("mrs", 2)
    resources:
        gpu=GPUS,
        runtime=RUNTIME.get("mrs", 120),
        mem_mb=MEM_MB,
    shell:
        "export OMP_NUM_THREADS={threads}; {params.cmd} > {log} 2>&1"
