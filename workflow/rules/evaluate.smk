rule evaluate:
    input:
        inputs("evaluate"),
    output:
        outputs("evaluate"),
    params:
        cmd=cmd("evaluate"),
    log:
        f"{ROOT}logs/evaluate/{{dataset}}/{{arch}}/{{tm}}/{{model}}.log",
    benchmark:
        f"{ROOT}benchmarks/evaluate/{{dataset}}/{{arch}}/{{tm}}/{{model}}.tsv"
    threads: THREADS.get("evaluate", 2)
    resources:
        gpu=GPUS,
        runtime=RUNTIME.get("evaluate", 240),
        mem_mb=MEM_MB,
    shell:
        "export OMP_NUM_THREADS={threads}; {params.cmd} > {log} 2>&1"
