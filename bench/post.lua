-- The hook request: POST /api/v1/dh with the token, as `curl --data` sends it.
-- CLOSE=1 asks for a new connection per request, as CI jobs calling once each do.
wrk.method = "POST"
wrk.body = os.getenv("BODY") or '{"imageTag":"1.2.0"}'
wrk.headers["X-Deploy-Hook-Token"] = os.getenv("TOKEN") or "none"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
if os.getenv("CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end
