"""The moderation HTTP service: FastAPI over the engine, on Ray Serve.

    settings.py  ServiceSettings: the `args` of deploy/serve.yaml
    schemas.py   request / response bodies
    inputs.py    request → video source → decoded frames (limits, allow-lists)
    registry.py  registered policy sets (a directory of YAML files)
    judge.py     the engine behind a `Judge`: EnginePool, LocalJudge
    pipeline.py  one moderation end to end (admission, decode, judge, metrics)
    jobs.py      the SQLite job store;  runner.py  the job runner and webhooks
    app.py       create_app(judge, settings): the FastAPI app
    deployment.py  Ray Serve ingress + model deployments, build_app(args)
    command.py   serve(...): what `guardrail serve` runs

Importing this package imports neither Ray nor FastAPI.
"""
