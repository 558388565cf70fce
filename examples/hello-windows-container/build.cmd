@echo off
rem The build winbuilder runs on the Windows server, in the copied workspace.
rem   build.cmd              prepare only (what `make demo` runs on the emulated host)
rem   build.cmd push IMAGE   also build and push the container image (needs Docker on the server)
echo building on %COMPUTERNAME% as %USERNAME% in %CD%
mkdir out 2>nul
echo built by winbuilder on %COMPUTERNAME% > out\build-info.txt
echo Grüße, 日本 >> out\build-info.txt
type out\build-info.txt
if not "%1"=="push" exit /b 0

rem Log docker in to the image's registry with the VM's service account. This avoids `gcloud auth
rem configure-docker`, whose credential helper entry ("gcloud") does not resolve on Windows, where it is gcloud.cmd.
for /f "delims=/" %%r in ("%2") do set REGISTRY=%%r
call gcloud auth print-access-token | docker login -u oauth2accesstoken --password-stdin https://%REGISTRY% || exit /b 1
docker build -t %2 . || exit /b 1
docker push %2
