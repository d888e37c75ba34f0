

prj-workerworker-
%https://github.com/example/worker.gitmain"
worker/Dockerfile(€Ðê¶·3